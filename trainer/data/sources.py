"""The data sets: each source reads its files (or generates its data) into uint8 tensors on
the CPU, and :func:`check_available` says cheaply whether a data set can be had."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import DatasetConfig
from trainer.data.errors import DataError
from trainer.data.tensors import ImageTensors, stratified_split
from trainer.images import image_cache_dir, list_images, load_images

__all__ = ["SOURCES", "check_available", "digits_arrays"]


@dataclass(frozen=True)
class _Source:
    """What a data set loader returns, on the CPU; load_splits carves val and moves it."""

    train: ImageTensors
    test: ImageTensors
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: from train split
    flip: bool = True


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
    # Only when a data set is downloaded: torchvision's data sets are slow to import.
    from torchvision.datasets.utils import download_and_extract_archive  # noqa: PLC0415

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


_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: every trial and every job seed sees the same test images
_DIGITS_CACHE = "digits-v1.npz"


def _digits(cfg: DatasetConfig, device: torch.device) -> _Source:
    _check_native_size(cfg, 8)
    images, labels = digits_arrays()
    full = ImageTensors(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))
    train, test = stratified_split(full, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
    return _Source(train, test, num_classes=10, flip=False)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images [1797, 8, 8] (its 0..16 scaled to 0..255) and
    int64 labels, kept in :func:`image_cache_dir` after the first load: importing
    scikit-learn costs each new trial process about two seconds."""
    path = image_cache_dir() / _DIGITS_CACHE
    if path.is_file():
        with np.load(path) as saved:
            return saved["images"], saved["labels"]
    from sklearn.datasets import load_digits  # noqa: PLC0415  (scikit-learn: slow to import)

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, images=images, labels=labels)
    os.replace(partial, path)  # atomic: a process starting meanwhile sees all or nothing
    return images, labels


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
        from torchvision import datasets  # noqa: PLC0415  (only to download; slow to import)

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


SOURCES = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "tinyimagenet": _tinyimagenet,
    "imagefolder": _imagefolder,
}
