import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from trainer.config import DatasetConfig
from trainer.data import DataError, DeviceLoader, ImageTensors, load_splits
from trainer.data.sources import digits_arrays


def _cfg(**kwargs) -> DatasetConfig:
    return DatasetConfig(**kwargs)


def _rows(split: ImageTensors) -> Counter:
    """Multiset of (image bytes, label): equal multisets mean the same images, any order."""
    return Counter(
        (img.numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels, strict=True)
    )


# ----------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits():
    return load_splits(_cfg(name="digits", val_fraction=0.1), seed=0)


def test_digits_shapes_and_metadata(digits):
    assert digits.train.images.dtype == torch.uint8
    assert digits.train.labels.dtype == torch.int64
    assert digits.train.images.shape[1:] == (1, 8, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert (digits.pad, digits.flip) == (1, False)
    assert digits.train.images.max() == 255  # 0..16 scaled to 0..255
    assert set(digits.test.labels.tolist()) == set(range(10))


def test_digits_split_respects_val_fraction_and_strata(digits):
    n_fit = len(digits.train) + len(digits.val)
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(digits.val) == pytest.approx(0.1 * n_fit, abs=10)
    fit_counts = torch.bincount(torch.cat([digits.train.labels, digits.val.labels]))
    val_counts = torch.bincount(digits.val.labels, minlength=10)
    assert ((val_counts - 0.1 * fit_counts).abs() <= 0.5 + 1e-9).all()


def test_digits_splits_partition_the_data_set(digits):
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    full = _rows(ImageTensors(images, torch.from_numpy(bunch.target)))
    assert _rows(digits.train) + _rows(digits.val) + _rows(digits.test) == full


def test_digits_are_read_from_the_cache_after_the_first_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MATE_IMAGE_CACHE", str(tmp_path))
    bunch = load_digits()
    first = digits_arrays()  # from scikit-learn, then written to the cache
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v1.npz"]
    # A new process reads the cache: the same arrays, and scikit-learn is never imported.
    script = (
        "import sys, numpy as np; from trainer.data.sources import digits_arrays; "
        "images, labels = digits_arrays(); assert 'sklearn' not in sys.modules; "
        "np.savez(sys.argv[1], images=images, labels=labels)"
    )
    out = tmp_path / "read.npz"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    with np.load(out) as second:
        for images, labels in (first, (second["images"], second["labels"])):
            assert images.dtype == np.uint8 and labels.dtype == np.int64
            np.testing.assert_array_equal(images, np.rint(bunch.images * 255 / 16))
            np.testing.assert_array_equal(labels, bunch.target)


def test_digits_val_split_is_seeded_and_test_split_is_fixed(digits):
    again = load_splits(_cfg(name="digits", val_fraction=0.1), seed=0)
    other = load_splits(_cfg(name="digits", val_fraction=0.1), seed=1)
    assert torch.equal(again.val.images, digits.val.images)
    assert torch.equal(again.train.labels, digits.train.labels)
    assert not torch.equal(other.val.images, digits.val.images)
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.test.labels, digits.test.labels)


def test_digits_zero_val_fraction_gives_no_val_split(digits):
    splits = load_splits(_cfg(name="digits", val_fraction=0.0), seed=3)
    assert splits.val is None
    assert _rows(splits.train) == _rows(digits.train) + _rows(digits.val)


def test_digits_mean_and_std_come_from_the_train_split(digits):
    x = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(x.mean().item(), abs=1e-9)
    assert digits.std[0] == pytest.approx(x.std(correction=0).item(), abs=1e-9)


def test_train_fraction_is_a_stratified_nested_subset_beside_a_fixed_val_split(digits):
    def load(fraction, seed=0):
        return load_splits(
            _cfg(name="digits", val_fraction=0.1, train_fraction=fraction), seed=seed
        )

    half, quarter = load(0.5), load(0.25)
    for part in (half, quarter):  # the val split does not move with the fraction
        assert torch.equal(part.val.images, digits.val.images)
        assert torch.equal(part.test.labels, digits.test.labels)
    full_counts = torch.bincount(digits.train.labels)
    for part, fraction in ((half, 0.5), (quarter, 0.25)):
        counts = torch.bincount(part.train.labels, minlength=10)
        assert torch.equal(counts, (full_counts * fraction).round().long())
        assert not _rows(part.train) - _rows(digits.train)  # drawn from the training split
    assert not _rows(quarter.train) - _rows(half.train)  # nested
    again, other = load(0.25), load(0.25, seed=1)
    assert torch.equal(again.train.images, quarter.train.images)
    assert not torch.equal(other.train.images, quarter.train.images)
    assert quarter.mean != digits.mean  # normalised with the subset's own statistics


def test_train_fraction_that_drops_a_class_is_an_error():
    cfg = _cfg(name="digits", val_fraction=0.1, train_fraction=0.002)
    with pytest.raises(DataError, match=r"train_fraction 0.002 leaves some classes without"):
        load_splits(cfg)


def test_digits_rejects_an_image_size():
    with pytest.raises(DataError, match=r"dataset.image_size is 32, but digits images are 8 px"):
        load_splits(_cfg(name="digits", image_size=32))


# ----------------------------------------------------------------------------------------
# synthetic


def test_synthetic_shapes_and_balance():
    cfg = _cfg(name="synthetic", num_samples=200, num_classes=4, image_size=16, val_fraction=0.2)
    splits = load_splits(cfg, seed=0)
    assert splits.train.images.shape == (160, 3, 16, 16)
    assert splits.val.images.shape == (40, 3, 16, 16)
    assert splits.test.images.shape == (40, 3, 16, 16)
    assert splits.train.images.dtype == torch.uint8
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (4, 3, 16)
    assert (splits.pad, splits.flip) == (2, True)
    assert torch.bincount(splits.val.labels).tolist() == [10] * 4


def test_synthetic_data_is_fixed_across_job_seeds():
    cfg = _cfg(name="synthetic", num_samples=64, val_fraction=0.0)
    a, b = load_splits(cfg, seed=0), load_splits(cfg, seed=5)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.images, b.test.images)


def test_synthetic_classes_are_separable():
    splits = load_splits(_cfg(name="synthetic", num_samples=512, val_fraction=0.0))
    x, y = splits.train.images.flatten(1).float(), splits.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(splits.test.images.flatten(1).float(), centroids).argmin(1)
    accuracy = (predicted == splits.test.labels).float().mean().item()
    assert accuracy > 0.5  # chance: 0.1


def test_load_splits_rejects_a_val_fraction_that_leaves_no_images():
    cfg = _cfg(name="synthetic", num_samples=16, num_classes=2, val_fraction=0.01)
    with pytest.raises(DataError, match=r"val_fraction 0\.01 leaves an empty split of the 16"):
        load_splits(cfg)


# ----------------------------------------------------------------------------------------
# cifar10 / cifar100 (torchvision's pickle format)

_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}


def _write_cifar(root: Path, name: str, per_file: int = 3) -> dict[str, ImageTensors]:
    folder, train_files, test_files = _CIFAR_LAYOUT[name]
    key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    written = {}
    for split, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for file in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, per_file).tolist()
            entry = {"batch_label": file, "data": data, key: y}
            if name == "cifar100":
                entry["coarse_labels"] = [0] * per_file
            with open(root / folder / file, "wb") as f:
                pickle.dump(entry, f)
            images.append(data.reshape(-1, 3, 32, 32))
            labels += y
        written[split] = ImageTensors(
            torch.from_numpy(np.concatenate(images)), torch.tensor(labels)
        )
    return written


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_torchvision_format(tmp_path, name, classes):
    written = _write_cifar(tmp_path, name)
    splits = load_splits(_cfg(name=name, root=str(tmp_path), val_fraction=0.0))
    assert torch.equal(splits.train.images, written["train"].images)
    assert torch.equal(splits.train.labels, written["train"].labels)
    assert torch.equal(splits.test.images, written["test"].images)
    assert torch.equal(splits.test.labels, written["test"].labels)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (classes, 3, 32)
    assert (splits.pad, splits.flip) == (4, True)
    assert splits.mean[0] == pytest.approx(0.4914 if name == "cifar10" else 0.5071)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_names_the_path_and_download(tmp_path, name):
    folder = _CIFAR_LAYOUT[name][0]
    with pytest.raises(DataError, match=rf"{name} not found under .*{folder}.*dataset.download"):
        load_splits(_cfg(name=name, root=str(tmp_path)))


def test_cifar_missing_batch_file_is_named(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_splits(_cfg(name="cifar10", root=str(tmp_path)))


def test_cifar_download_fetches_torchvision_archive(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, filename))
        _write_cifar(Path(download_root), "cifar100")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", fake_download)
    cfg = _cfg(name="cifar100", root=str(tmp_path), download=True, val_fraction=0)
    splits = load_splits(cfg)
    assert calls == [
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz")
    ]
    assert splits.num_classes == 100


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", failing)
    with pytest.raises(DataError, match="could not download tinyimagenet from http"):
        load_splits(_cfg(name="tinyimagenet", root=str(tmp_path), download=True))


# ----------------------------------------------------------------------------------------
# tinyimagenet and imagefolder (image files decoded by PIL)

_COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def _write_image(path: Path, color, size=(64, 64), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    (img.convert("L") if mode == "L" else img).save(path)


def _write_tinyimagenet(root: Path) -> None:
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # unsorted on disk: classes are the sorted wnids
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        color = _COLORS[sorted(wnids).index(wnid)]
        for i in range(4):
            _write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", color)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        _write_image(base / "val" / "images" / f"val_{i}.JPEG", _COLORS[int(wnid[-1]) - 1])
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _write_image(base / "test" / "images" / "test_0.JPEG", (0, 0, 0))  # unlabelled, unused


def _mean_colors(split: ImageTensors) -> torch.Tensor:
    return split.images.float().mean(dim=(2, 3))  # [N, 3]


def test_tinyimagenet_loads_train_and_val_folders(tmp_path):
    _write_tinyimagenet(tmp_path)
    splits = load_splits(_cfg(name="tinyimagenet", root=str(tmp_path), val_fraction=0.25))
    assert splits.train.images.shape == (9, 3, 64, 64)
    assert splits.val.images.shape == (3, 3, 64, 64)
    assert splits.test.labels.tolist() == [2, 0, 1, 0]
    assert (splits.num_classes, splits.image_size, splits.pad, splits.flip) == (3, 64, 8, True)
    colors = torch.tensor(_COLORS, dtype=torch.float32)
    for split in (splits.train, splits.val, splits.test):  # JPEG is lossy: near the colour
        assert (_mean_colors(split) - colors[split.labels]).abs().max() < 8


def test_tinyimagenet_missing_names_the_path_and_download(tmp_path):
    with pytest.raises(DataError, match=r"tiny-imagenet-200; set dataset.download: true"):
        load_splits(_cfg(name="tinyimagenet", root=str(tmp_path)))


def _write_imagefolder(root: Path, test_name: str = "test") -> None:
    for split, count in (("train", 3), (test_name, 2)):
        for label, name in enumerate(["cat", "ant"]):  # classes sort to ant=0, cat=1
            for i in range(count):
                ext = "png" if i % 2 else "jpg"
                _write_image(root / split / name / f"{i}.{ext}", _COLORS[label], size=(40, 30))
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    _write_image(root / "train" / "ant" / "gray.png", (128, 128, 128), mode="L")


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_imagefolder_resizes_and_labels_by_sorted_folder(tmp_path, test_name):
    _write_imagefolder(tmp_path, test_name)
    splits = load_splits(
        _cfg(name="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0)
    )
    assert splits.train.images.shape == (7, 3, 16, 16)
    assert splits.test.images.shape == (4, 3, 16, 16)
    assert splits.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]  # ant: 0.jpg 1.png 2.jpg gray
    assert splits.num_classes == 2
    gray = splits.train.images[3].float()  # 1-channel PNG converted to RGB
    assert (gray - 128).abs().max() <= 1
    expected = torch.tensor(_COLORS, dtype=torch.float32)[[1, 1, 0, 0]]
    assert (_mean_colors(splits.test) - expected).abs().max() < 8


def test_imagefolder_defaults_to_64_px(tmp_path):
    _write_imagefolder(tmp_path)
    splits = load_splits(_cfg(name="imagefolder", root=str(tmp_path), val_fraction=0))
    assert splits.image_size == 64


def test_imagefolder_missing_train_names_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"imagefolder not found: .*train does not exist"):
        load_splits(_cfg(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_unknown_test_class_is_an_error(tmp_path):
    _write_imagefolder(tmp_path)
    _write_image(tmp_path / "test" / "bee" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"classes missing from train/: \['bee'\]"):
        load_splits(_cfg(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_corrupt_image_is_named(tmp_path):
    _write_imagefolder(tmp_path)
    (tmp_path / "test" / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode .*bad.png"):
        load_splits(_cfg(name="imagefolder", root=str(tmp_path), val_fraction=0))


# ----------------------------------------------------------------------------------------
# DeviceLoader


def _ramp(n: int, channels: int = 1, size: int = 8) -> ImageTensors:
    """n copies of an image whose pixels are all distinct and nonzero, labels 0..n-1."""
    image = torch.arange(1, channels * size * size + 1, dtype=torch.uint8)
    image = image.view(1, channels, size, size)
    return ImageTensors(image.repeat(n, 1, 1, 1), torch.arange(n))


def _loader(split, batch_size=4, seed=0, **kwargs) -> DeviceLoader:
    kwargs = {
        "mean": (0.0,) * split.images.shape[1],
        "std": (1.0,) * split.images.shape[1],
    } | kwargs
    return DeviceLoader(split, batch_size, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_device_loader_len_and_batch_shapes():
    split = _ramp(10, channels=3)
    batches = list(_loader(split, train=True))
    assert len(_loader(split, train=True)) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    dropped = _loader(split, train=True, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 2


def test_device_loader_eval_yields_normalised_images_in_order():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    split = ImageTensors(images, torch.arange(10))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.cat([b for b, _ in _loader(split, mean=mean, std=std, train=False)])
    y = torch.cat([b for _, b in _loader(split, mean=mean, std=std, train=False)])
    expected = (images / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(x, expected)
    assert y.tolist() == list(range(10))


def test_device_loader_train_epoch_is_a_fresh_permutation():
    loader = _loader(_ramp(50), train=True)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert not torch.equal(first, second)


def test_device_loader_crop_is_a_window_of_the_zero_padded_image():
    split = _ramp(200)
    padded = torch.nn.functional.pad(split.images[0, 0].float(), (2, 2, 2, 2))  # [12, 12]
    windows = {
        (top, left): padded[top : top + 8, left : left + 8] for top in range(5) for left in range(5)
    }
    seen = set()
    for x, _ in _loader(split, train=True, pad=2, flip=False):
        for image in x[:, 0] * 255:
            matches = [k for k, w in windows.items() if torch.allclose(image, w, atol=1e-3)]
            assert len(matches) == 1
            seen.add(matches[0])
    assert len(seen) == 25  # every offset in [0, 2p] x [0, 2p] occurs


def test_device_loader_default_pad_is_an_eighth_of_the_size():
    assert _loader(_ramp(2, size=32), train=True).pad == 4
    assert _loader(_ramp(2, size=8), train=True).pad == 1


def test_device_loader_flips_about_half_the_samples():
    split = _ramp(2000, channels=2)
    original = split.images[0].float() / 255
    flips = 0
    for x, _ in _loader(split, batch_size=256, train=True, pad=0, flip=True):
        same = torch.isclose(x, original).flatten(1).all(1)
        mirrored = torch.isclose(x, original.flip(-1)).flatten(1).all(1)
        assert (same ^ mirrored).all()
        flips += int(mirrored.sum())
    assert 900 < flips < 1100


def test_device_loader_without_flip_never_mirrors():
    split = _ramp(300)
    for x, _ in _loader(split, batch_size=300, train=True, pad=0, flip=False):
        torch.testing.assert_close(x, split.images.float() / 255)


def test_device_loader_equal_seeds_give_identical_batches():
    split = ImageTensors(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), torch.arange(37))
    a, b, c = (_loader(split, seed=s, train=True) for s in (7, 7, 8))
    for _ in range(2):  # two epochs
        batches_a, batches_b, batches_c = list(a), list(b), list(c)
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not all(
            torch.equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c, strict=True)
        )


def test_device_loader_channels_last_and_dtype():
    split = _ramp(6, channels=3)
    x, _ = next(iter(_loader(split, train=True, channels_last=True, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(_loader(split, train=False, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    x, _ = next(iter(_loader(split, train=False)))
    assert x.is_contiguous()


def test_device_loader_rejects_bad_arguments():
    split = _ramp(4, channels=3)
    with pytest.raises(ValueError, match="batch_size is 0, but must be >= 1"):
        DeviceLoader(split, 0, mean=(0,) * 3, std=(1,) * 3, train=True)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        DeviceLoader(split, 2, mean=(0,), std=(1,), train=True)


def test_device_loader_on_digits_normalises_to_zero_mean(digits):
    loader = DeviceLoader(
        digits.train, 256, mean=digits.mean, std=digits.std, train=False, flip=digits.flip
    )
    x = torch.cat([b for b, _ in loader])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
