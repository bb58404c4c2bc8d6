"""DeviceLoader vs torchvision's standard CIFAR input pipeline, side by side, on the CPU.

Both produce the same thing per epoch: shuffled batches of 128 randomly cropped (padding 4),
randomly flipped, normalised float images with their labels, from CIFAR-shaped random uint8
data held in memory. torchvision: a Dataset that makes a PIL image per sample, as
torchvision.datasets.CIFAR10 does, with RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize, under a DataLoader with 2 worker processes (persistent, so worker
start-up is not counted against it). DeviceLoader: one process, `--threads` intra-op threads
(default 1, fewer cores than torchvision gets: on a busy machine more OpenMP threads than free
cores spin-wait at barriers and starve both pipelines; OMP_WAIT_POLICY=PASSIVE avoids that).
Each repeat runs one epoch of each; the figures are medians over repeats after a warm-up
epoch of each.

    .venv/bin/python bench/bench_data.py            # 10k images, 5 repeats (~30 s)
    .venv/bin/python bench/bench_data.py --quick    # 2k images, 3 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import machine, versions
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from trainer.data import DeviceLoader, ImageTensors

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, metavar="N", help="default 10000")
    parser.add_argument("--repeats", type=int, default=5, metavar="R", help="default 5")
    parser.add_argument("--batch-size", type=int, default=128, metavar="B", help="default 128")
    parser.add_argument(
        "--threads", type=int, default=1, metavar="T", help="DeviceLoader threads, default 1"
    )
    parser.add_argument("--quick", action="store_true", help="2000 images, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 2_000, 3
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).tolist()

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
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        tv_rates.append(epoch_rate(torchvision_loader))
        dev_rates.append(epoch_rate(device_loader))
    tv, dev = statistics.median(tv_rates), statistics.median(dev_rates)

    print(versions("torch", "torchvision", "numpy", "PIL"))
    print(
        f"{machine()}; "
        f"{args.images} images 32x32x3, batch {args.batch_size}, "
        f"median of {args.repeats} epochs after a warm-up"
    )
    device_name = f"DeviceLoader ({args.threads} thread{'s' * (args.threads > 1)})"
    print(f"{'torchvision DataLoader (2 workers, PIL)':40} {tv:10,.0f} images/s")
    print(f"{device_name:40} {dev:10,.0f} images/s")
    print(f"{'ratio DeviceLoader / torchvision':40} {dev / tv:10.1f}x")


if __name__ == "__main__":
    main()
