"""CIFAR-10 as 32x32 JPEGs for tests and benchmarks: ``../shared/data/cifar10-jpeg.tar.gz``
beside the repository, extracted once per machine into the user's cache directory.

Never commit the images or anything derived from them. A test that needs them fails (never
skips) when the archive is missing: CI has ``../shared`` beside the clone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from trainer.images import list_images, user_cache_dir

__all__ = ["ARCHIVE", "cifar10_jpeg", "cifar10_subset"]

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar10_jpeg() -> Path:
    """The extracted ``cifar10-jpeg`` root: ``train/<class>/*.jpg`` (50k), ``test/...`` (10k).

    Extracts into ``user_cache_dir()/datasets/<archive hash>/`` on first use, under a file lock
    and through a rename, so concurrent test runs and benchmarks extract once and never see a
    half-extracted tree. Raises FileNotFoundError naming the archive when it is missing.
    """
    if not ARCHIVE.is_file():
        raise FileNotFoundError(
            f"{ARCHIVE} is missing: the CIFAR-10 JPEG tests and benchmarks need "
            "shared/data/cifar10-jpeg.tar.gz beside the repository"
        )
    digest = hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()[:16]
    home = user_cache_dir() / "datasets" / f"cifar10-jpeg-{digest}"
    root = home / "cifar10-jpeg"
    if root.is_dir():
        return root
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not root.is_dir():
            partial = home / f"partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            with tarfile.open(ARCHIVE) as archive:
                archive.extractall(partial, filter="data")
            os.replace(partial / "cifar10-jpeg", root)
            shutil.rmtree(partial)
    return root


def cifar10_subset(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """An imagefolder at `dest` of symlinks to the first images of each class; returns `dest`."""
    source = cifar10_jpeg()
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((source / split).iterdir()):
            target = dest / split / class_dir.name
            target.mkdir(parents=True)
            for name in list_images(class_dir)[:count]:
                (target / name).symlink_to(class_dir / name)
    return dest
