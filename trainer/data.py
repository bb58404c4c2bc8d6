"""Data sets and the device-resident input pipeline (DESIGN §7).

:func:`load_splits` reads a whole data set once into uint8 tensors on the training device;
:class:`DeviceLoader` serves normalised float batches from them, shuffling with an on-device
permutation and augmenting whole batches at once (random crop with zero padding and
horizontal flip folded into one gather): no workers, no per-image PIL in the hot loop.
After airbench, https://github.com/KellerJordan/cifar10-airbench.

Splits. ``train`` is the official training set minus ``val``: a class-stratified
``dataset.val_fraction`` share drawn from the job seed alone, which the hyperparameter search
selects on. ``dataset.train_fraction`` < 1 then keeps a class-stratified share of ``train``,
also drawn from the seed alone; ``val`` is carved first, so it is the same for every
fraction, and smaller fractions give nested subsets. ``test`` is fixed for every seed: the
official test split (TinyImageNet: its labelled ``val`` folder, since the official test
images have no labels), for digits a fixed stratified 20 % of the 1797 images, for synthetic
a generated set of ``num_samples // 5``.

Data sets (``dataset.name``; paths below are under ``dataset.root``, ``~`` expanded):

============  ===============================================  ======  =================
name          on disk                                          pixels  mean/std
============  ===============================================  ======  =================
digits        bundled with scikit-learn (1 channel, 0..16      8       train split
              scaled to 0..255)
synthetic     generated from a fixed seed                      32 [*]  train split
cifar10       ``cifar-10-batches-py/`` (torchvision's)         32      standard constants
cifar100      ``cifar-100-python/`` (torchvision's)            32      standard constants
tinyimagenet  ``tiny-imagenet-200/`` (the official zip)        64 [*]  train split
imagefolder   ``root`` itself: ``train/<class>/<image>`` and   64 [*]  train split
              ``test/<class>/<image>`` (or ``val/``)
============  ===============================================  ======  =================

[*] ``dataset.image_size`` overrides it; decoded images are resized so the shorter side fits
and centre-cropped. 64 px keeps an imagefolder set small enough for device memory (10k
images: 120 MB); fine-grained work usually wants ``image_size: 224``. tinyimagenet and
imagefolder are decoded once per node into a memory-mapped cache (:mod:`trainer.images`);
later jobs map it instead of decoding.

Augmentation (training only): zero padding of ``DataSplits.pad = image_size // 8`` pixels
(4 for 32 px, 1 for 8 px digits, 8 for 64 px) with a random crop back to size, and a random
horizontal flip where ``DataSplits.flip`` says mirrored images keep their label: not for
digits, whose meaning flipping can change.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import DatasetConfig
from trainer.images import DataError, list_images, load_images
from trainer.pixels import normalise, pixel_affine

__all__ = [
    "DataError",
    "DataSplits",
    "DeviceLoader",
    "ImageTensors",
    "check_available",
    "load_splits",
]


@dataclass(frozen=True)
class ImageTensors:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device) -> ImageTensors:
        """Copy to `device`; to a GPU from pinned memory, without blocking the host."""
        device = torch.device(device)
        if device.type != "cuda":
            return ImageTensors(self.images.to(device), self.labels.to(device))
        return ImageTensors(
            self.images.pin_memory().to(device, non_blocking=True),
            self.labels.pin_memory().to(device, non_blocking=True),
        )


@dataclass(frozen=True)
class DataSplits:
    train: ImageTensors
    val: ImageTensors | None  # None when val_fraction == 0
    test: ImageTensors
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    flip: bool  # whether a mirrored image keeps its label (pass to DeviceLoader)
    pad: int  # random-crop padding in pixels, image_size // 8 (pass to DeviceLoader)


def load_splits(
    cfg: DatasetConfig, device: torch.device | str = "cpu", *, seed: int = 0
) -> DataSplits:
    """Load ``cfg.name`` onto `device`, carve the validation split and the training subset.

    Both draws depend on `seed` alone. The validation split comes first, from the whole
    training set, so it is the same for every ``cfg.train_fraction``; the subset is a
    class-stratified share of what remains (smaller fractions give nested subsets).
    Raises :class:`DataError` when the data set is missing (naming where it looked and how to
    get it), malformed, or too small for ``cfg.val_fraction`` or ``cfg.train_fraction``.
    """
    device = torch.device(device)
    source = _SOURCES[cfg.name](cfg, device)
    train, val = source.train, None
    if cfg.val_fraction > 0:
        train, val = _stratified_split(source.train, cfg.val_fraction, seed)
        if len(val) == 0 or len(train) == 0:
            raise DataError(
                f"dataset.val_fraction {cfg.val_fraction} leaves an empty split of the "
                f"{len(source.train)} {cfg.name} training images"
            )
    if cfg.train_fraction < 1:
        _, subset = _stratified_split(train, cfg.train_fraction, seed)
        if subset.labels.unique().numel() < train.labels.unique().numel():
            raise DataError(
                f"dataset.train_fraction {cfg.train_fraction} leaves some classes without "
                f"images ({len(subset)} of {len(train)} {cfg.name} training images); raise it"
            )
        train = subset
    mean, std = source.stats or _channel_stats(train.images)
    _, channels, height, width = train.images.shape
    assert height == width, "loaders produce square images"
    return DataSplits(
        train=train.to(device),
        val=None if val is None else val.to(device),
        test=source.test.to(device),
        num_classes=source.num_classes,
        in_channels=channels,
        image_size=height,
        mean=mean,
        std=std,
        flip=source.flip,
        pad=height // 8,
    )


# ----------------------------------------------------------------------------------------
# The device loader


class DeviceLoader:
    """Iterate ``(inputs [B, C, H, W] normalised float, labels [B] int64)`` over a split.

    Everything runs on the split's device. ``train=True``: each epoch (each ``iter``) draws a
    fresh permutation from `generator`, and each batch gets per-sample random crops of the
    image zero-padded by `pad` pixels (None: ``H // 8``) and, if `flip`, a mirror for about
    half of the samples. The generator must live on the split's device and fully determines
    the order and the augmentation; None uses that device's default generator.
    ``train=False``: the split in order, unaugmented.
    """

    def __init__(
        self,
        split: ImageTensors,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        generator: torch.Generator | None = None,
        pad: int | None = None,
        flip: bool = True,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ) -> None:
        device = split.images.device
        channels = split.images.shape[1]
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}, but must be >= 1")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per channel")
        if generator is not None and generator.device != device:
            raise ValueError(f"generator is on {generator.device}, but the data is on {device}")
        self.split = split
        self.batch_size = batch_size
        self.train = train
        self.generator = generator
        self.pad = split.images.shape[-1] // 8 if pad is None else pad
        self.flip = flip
        self.channels_last = channels_last
        self.dtype = dtype
        self.drop_last = drop_last
        self._scale, self._shift = pixel_affine(mean, std, device)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.images, self.split.labels
        order = None
        if self.train:
            order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                x = images[start : start + self.batch_size]
                y = labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                x, y = self._augment(images[index]), labels[index]
            yield self._normalise(x), y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch plus random mirror, as one gather. uint8."""
        if not self.pad and not self.flip:
            return x
        b, c, h, w = x.shape
        p, g, device = self.pad, self.generator, x.device
        padded = F.pad(x, (p, p, p, p)) if p else x  # [B, C, H+2p, W+2p]
        top = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=device)
        left = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=device)
        cols = torch.arange(w, device=device).expand(b, w)
        if self.flip:
            mirrored = torch.rand(b, 1, generator=g, device=device) < 0.5
            cols = torch.where(mirrored, cols.flip(1), cols)  # read columns right to left
        rows = top + torch.arange(h, device=device)  # [B, H]
        cols = left + cols  # [B, W]
        flat = rows.unsqueeze(2) * (w + 2 * p) + cols.unsqueeze(1)  # [B, H, W] into padded
        flat = flat.view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # cheaper on uint8
        out = normalise(x, self._scale, self._shift)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


# ----------------------------------------------------------------------------------------
# Shared helpers


@dataclass(frozen=True)
class _Source:
    """What a data set loader returns, on the CPU; load_splits carves val and moves it."""

    train: ImageTensors
    test: ImageTensors
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: from train split
    flip: bool = True


def _stratified_split(
    data: ImageTensors, fraction: float, seed: int
) -> tuple[ImageTensors, ImageTensors]:
    """(rest, part): round(fraction * n_c) random images of each class c go to part.

    Depends on `seed` alone (its own generator), and both keep the original order.
    """
    labels = data.labels
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # by class, random within
    grouped = labels[order]
    counts = torch.bincount(grouped)
    first = torch.cumsum(counts, 0) - counts  # position of each class's first image in order
    rank = torch.arange(len(order)) - first[grouped]  # rank within its class
    in_part = rank < (counts * fraction).round().long()[grouped]
    rest, part = order[~in_part].sort().values, order[in_part].sort().values
    return _take(data, rest), _take(data, part)


def _take(data: ImageTensors, index: torch.Tensor) -> ImageTensors:
    """The rows `index` of `data`, copied (index_select on flat rows: one memcpy per image)."""
    images = data.images.flatten(1).index_select(0, index).view(-1, *data.images.shape[1:])
    return ImageTensors(images, data.labels[index])


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W], in [0, 1] units.

    Exact, from each channel's 256-bin histogram (faster than summing floats)."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * values.square()).sum() / n - mean.square()
        means.append(mean.item() / 255)
        stds.append(max(var.item(), 1.0) ** 0.5 / 255)  # >= 1/255: no division by zero
    return tuple(means), tuple(stds)


def _root(cfg: DatasetConfig) -> Path:
    return Path(cfg.root).expanduser()


def _imagefolder_layout(root: Path) -> str:
    return f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> (or val/)"


def check_available(cfg: DatasetConfig) -> None:
    """Raise :class:`DataError` when a data set is neither on disk nor to be downloaded.

    Cheap (looks at one path, loads nothing), so commands call it before starting anything.
    """
    root = _root(cfg)
    if cfg.name in _CIFAR:
        path = root / _CIFAR[cfg.name][0]
        if not path.is_dir() and not cfg.download:
            raise DataError(
                f"{cfg.name} not found under {path}; set dataset.download: true "
                "or place the extracted archive there"
            )
    elif cfg.name == "tinyimagenet":
        path = root / "tiny-imagenet-200" / "wnids.txt"
        if not path.is_file() and not cfg.download:
            raise DataError(
                f"tinyimagenet not found under {path.parent}; set dataset.download: true "
                f"or extract {_TINY_URL} into {root}"
            )
    elif cfg.name == "imagefolder" and not (root / "train").is_dir():
        raise DataError(
            f"imagefolder not found: {root / 'train'} does not exist; "
            f"{_imagefolder_layout(root)}, prepared by hand (dataset.download does not apply)"
        )


def _check_native_size(cfg: DatasetConfig, size: int) -> None:
    if cfg.image_size is not None and cfg.image_size != size:
        raise DataError(
            f"dataset.image_size is {cfg.image_size}, but {cfg.name} images are {size} px; "
            "leave it unset"
        )


def _download(name: str, url: str, root: Path, md5: str, filename: str | None = None) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, str(root), filename=filename, md5=md5)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DataError(f"could not download {name} from {url} into {root}: {err}") from None


def _scan_classes(folder: Path, class_dirs: Sequence[str]) -> tuple[list[str], list[int]]:
    """Image files under ``folder/class_dirs[i]`` (relative to `folder`) with label i."""
    files, labels = [], []
    for label, name in enumerate(class_dirs):
        found = list_images(folder / name)
        files += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    return files, labels


def _from_files(
    folder: Path, files: list[str], labels: list[int], size: int, device: torch.device
) -> ImageTensors:
    """The images ``folder/files`` (decoded once per node, then memory-mapped), labelled."""
    images = load_images(folder, files, size, device=device)
    return ImageTensors(images, torch.tensor(labels, dtype=torch.int64))


# ----------------------------------------------------------------------------------------
# Data sets

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: every trial and every job seed sees the same test images


def _digits(cfg: DatasetConfig, device: torch.device) -> _Source:
    from sklearn.datasets import load_digits

    _check_native_size(cfg, 8)
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16
    full = ImageTensors(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target).to(torch.int64)
    )
    train, test = _stratified_split(full, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
    return _Source(train, test, num_classes=10, flip=False)


_SYNTHETIC_SEED = 0


def _synthetic(cfg: DatasetConfig, device: torch.device) -> _Source:
    """Class prototypes (smooth random patterns, mirror-symmetric so that flips keep the
    label) shown at a random circular shift of up to a quarter of the image, with random
    brightness and pixel noise. A linear model on raw pixels reaches about 99 % test accuracy
    at the defaults, nearest class mean about 80 %; chance is 1 / num_classes."""
    size, k = cfg.image_size or 32, cfg.num_classes
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    coarse = torch.randn(k, 3, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    protos = protos + protos.flip(-1)
    protos = protos / protos.std(dim=(1, 2, 3), keepdim=True)  # [K, 3, S, S], unit std

    def sample(n: int) -> ImageTensors:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        shift = size // 4
        dy, dx = torch.randint(-shift, shift + 1, (2, n, 1), generator=g)
        rows = (dy + torch.arange(size)) % size  # [N, S]
        cols = (dx + torch.arange(size)) % size
        shape = (n, 3, size, size)
        x = protos[labels].gather(2, rows[:, None, :, None].expand(shape))
        x = x.gather(3, cols[:, None, None, :].expand(shape))  # circularly shifted prototypes
        brightness = 20 * torch.randn(n, 1, 1, 1, generator=g)
        x = 128 + brightness + 45 * x + 40 * torch.randn(x.shape, generator=g)
        return ImageTensors(x.round().clamp(0, 255).to(torch.uint8), labels)

    train = sample(cfg.num_samples)
    return _Source(train, sample(max(cfg.num_samples // 5, k)), num_classes=k)


# folder, training files, test files, label key, classes, standard (mean, std) of the train set
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
        ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        100,
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ),
}


def _cifar(cfg: DatasetConfig, device: torch.device) -> _Source:
    """torchvision's on-disk format (python pickles), read directly: torchvision's classes
    would also check every file's MD5 on each load."""
    _check_native_size(cfg, 32)
    folder, train_files, test_files, label_key, classes, stats = _CIFAR[cfg.name]
    root = _root(cfg)
    path = root / folder
    if not path.is_dir():
        check_available(cfg)
        from torchvision import datasets

        tv = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        _download(cfg.name, tv.url, root, tv.tgz_md5, tv.filename)

    def read(files: list[str]) -> ImageTensors:
        images, labels = [], []
        for name in files:
            file = path / name
            if not file.is_file():
                raise DataError(
                    f"{cfg.name}: {file} is missing; re-extract the archive into {root}"
                )
            with file.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
            try:
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(entry[label_key])
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{cfg.name}: {file} is not a CIFAR batch ({err})") from None
        return ImageTensors(
            torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)
        )

    return _Source(read(train_files), read(test_files), num_classes=classes, stats=stats)


_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _tinyimagenet(cfg: DatasetConfig, device: torch.device) -> _Source:
    root = _root(cfg)
    path = root / "tiny-imagenet-200"
    if not (path / "wnids.txt").is_file():
        check_available(cfg)
        _download("tinyimagenet", _TINY_URL, root, _TINY_MD5)
    wnids = sorted((path / "wnids.txt").read_text().split())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train_files, train_labels = _scan_classes(path / "train", [f"{w}/images" for w in wnids])
    annotations = path / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"tinyimagenet: {annotations} is missing; re-extract {_TINY_URL}")
    test_files, test_labels = [], []
    for line in annotations.read_text().splitlines():
        if line.strip():
            name, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise DataError(f"tinyimagenet: {annotations} names {wnid}, not in wnids.txt")
            test_files.append(name)
            test_labels.append(index[wnid])
    if not train_files or not test_files:
        raise DataError(f"tinyimagenet: no images under {path}; re-extract {_TINY_URL}")
    size = cfg.image_size or 64
    return _Source(
        _from_files(path / "train", train_files, train_labels, size, device),
        _from_files(path / "val" / "images", test_files, test_labels, size, device),
        num_classes=len(wnids),
    )


def _imagefolder(cfg: DatasetConfig, device: torch.device) -> _Source:
    root = _root(cfg)
    layout = _imagefolder_layout(root)
    check_available(cfg)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"imagefolder: {root} has train/ but neither test/ nor val/; {layout}")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    extra = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise DataError(f"imagefolder: {test_dir} has classes missing from train/: {extra}")

    def load(split_dir: Path) -> ImageTensors:
        files, labels = _scan_classes(split_dir, classes)
        if not files:
            raise DataError(f"imagefolder: no images under {split_dir}; {layout}")
        return _from_files(split_dir, files, labels, cfg.image_size or 64, device)

    return _Source(load(root / "train"), load(test_dir), num_classes=len(classes))


_SOURCES = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "tinyimagenet": _tinyimagenet,
    "imagefolder": _imagefolder,
}
