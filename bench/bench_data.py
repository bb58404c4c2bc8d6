"""The input path, side by side on the CPU: decode-once cache, and DeviceLoader vs DataLoader.

**Decode** (CIFAR-10 as 60,000 JPEGs, ``../shared/data/cifar10-jpeg.tar.gz`` extracted once by
the tests' helper): the time until ``load_splits`` returns for ``imagefolder`` at 32 px, cold
(an empty cache: list, stat, decode with torchvision, write the cache) and warm (the cache
built by the cold run: list, stat, memory-map), against decoding the same files with PIL
on a thread pool as the loader did before the cache (decode only: no listing, splitting or
statistics). Both decoders get `--threads` threads (default 1: a one-CPU trial). Target:
warm <= 1/20 of cold. Each repeat runs PIL, cold and warm in turn, cold on a fresh cache.

**Pipeline**, DeviceLoader vs torchvision's standard CIFAR input pipeline. Both produce the
same thing per epoch: shuffled batches of 128 randomly cropped (padding 4), randomly flipped,
normalised float images with their labels, from CIFAR-shaped random uint8 data held in
memory. torchvision: a Dataset that makes a PIL image per sample, as
torchvision.datasets.CIFAR10 does, with RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize, under a DataLoader with 2 worker processes (persistent, so worker
start-up is not counted against it). DeviceLoader: one process, `--threads` intra-op threads
(default 1, fewer cores than torchvision gets: on a busy machine more OpenMP threads than free
cores spin-wait at barriers and starve both pipelines; OMP_WAIT_POLICY=PASSIVE avoids that).
Each repeat runs one epoch of each; the figures are medians over repeats after a warm-up
epoch of each.

    .venv/bin/python bench/bench_data.py            # both parts (~2 min)
    .venv/bin/python bench/bench_data.py --only decode --repeats 3
    .venv/bin/python bench/bench_data.py --quick    # 6k JPEGs; 2k images, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import machine, versions
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from trainer.config import DatasetConfig
from trainer.data import DeviceLoader, ImageTensors, load_splits
from trainer.images import list_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg, cifar10_subset  # the tests' data helper

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class PILImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: list[int], transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def epoch_rate(loader) -> float:
    """Images per second over one full pass."""
    start, n = time.perf_counter(), 0
    for _, y in loader:
        n += len(y)
    return n / (time.perf_counter() - start)


def pil_decode(paths: list[str], size: int, threads: int) -> np.ndarray:
    """The loader before the cache: PIL per file on a thread pool, [N, H, W, 3] uint8."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        with Image.open(paths[i]) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            if img.size != (size, size):
                img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(img)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(decode, range(len(paths))))
    return out


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_decode(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    root = cifar10_subset(work / "subset", 500, 100) if args.quick else cifar10_jpeg()
    paths = [str(p) for split in ("train", "test") for p in _files(root / split)]
    cfg = DatasetConfig(name="imagefolder", root=str(root), image_size=32, val_fraction=0.1)
    times: dict[str, list[float]] = {"pil": [], "cold": [], "warm": []}
    for repeat in range(args.repeats):
        times["pil"].append(seconds(lambda: pil_decode(paths, 32, args.threads)))
        os.environ["MATE_IMAGE_CACHE"] = str(work / f"cache-{repeat}")
        times["cold"].append(seconds(lambda: load_splits(cfg, seed=0)))
        times["warm"].append(seconds(lambda: load_splits(cfg, seed=0)))
    pil, cold, warm = (statistics.median(times[k]) for k in ("pil", "cold", "warm"))

    print(versions("torch", "torchvision", "numpy", "PIL"))
    print(
        f"{machine()}; {len(paths)} CIFAR-10 JPEGs at 32 px, {torch.get_num_threads()} decode "
        f"threads, median of {args.repeats} (spread: {_spread(times)})"
    )
    print(f"{'PIL per file, thread pool (decode only)':44} {pil:8.2f} s")
    print(f"{'cold: load_splits, decode + write cache':44} {cold:8.2f} s")
    print(f"{'warm: load_splits, memory-mapped cache':44} {warm:8.2f} s")
    print(f"{'warm / cold':44} {warm / cold:8.3f}   (1/{cold / warm:.0f}; target <= 1/20)")
    print(f"{'warm / PIL':44} {warm / pil:8.3f}   (1/{pil / warm:.0f})")


def _files(folder: Path) -> list[Path]:
    return [c / f for c in sorted(folder.iterdir()) for f in list_images(c)]


def _spread(times: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} s" for k, v in times.items())


def bench_pipeline(args: argparse.Namespace) -> None:
    images = 2_000 if args.quick else args.images
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, images).tolist()

    standard = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    torchvision_loader = DataLoader(
        PILImages(hwc, labels, standard),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )
    split = ImageTensors(
        torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)
    )
    device_loader = DeviceLoader(
        split,
        args.batch_size,
        mean=MEAN,
        std=STD,
        train=True,
        generator=torch.Generator().manual_seed(0),
        pad=4,
        flip=True,
    )

    epoch_rate(torchvision_loader), epoch_rate(device_loader)  # warm-up
    tv_rates, dev_rates = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        tv_rates.append(epoch_rate(torchvision_loader))
        dev_rates.append(epoch_rate(device_loader))
    tv, dev = statistics.median(tv_rates), statistics.median(dev_rates)

    print(versions("torch", "torchvision", "numpy", "PIL"))
    print(
        f"{machine()}; "
        f"{images} images 32x32x3, batch {args.batch_size}, "
        f"median of {repeats} epochs after a warm-up"
    )
    device_name = f"DeviceLoader ({args.threads} thread{'s' * (args.threads > 1)})"
    print(f"{'torchvision DataLoader (2 workers, PIL)':40} {tv:10,.0f} images/s")
    print(f"{device_name:40} {dev:10,.0f} images/s")
    print(f"{'ratio DeviceLoader / torchvision':40} {dev / tv:10.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["decode", "pipeline"], help="run one part")
    parser.add_argument("--images", type=int, default=10_000, metavar="N", help="default 10000")
    parser.add_argument("--repeats", type=int, default=5, metavar="R", help="default 5")
    parser.add_argument("--batch-size", type=int, default=128, metavar="B", help="default 128")
    parser.add_argument(
        "--threads", type=int, default=1, metavar="T", help="decode/DeviceLoader threads, default 1"
    )
    parser.add_argument("--quick", action="store_true", help="smaller inputs, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    if args.only != "pipeline":
        bench_decode(args)
    if args.only != "decode":
        bench_pipeline(args)


if __name__ == "__main__":
    main()
