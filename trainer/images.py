"""Image files: listing, decoding, and the decode-once cache every job of a node shares.

:func:`load_images` turns a list of image files into one uint8 tensor [N, 3, S, S]. The first
job on a node decodes them (torchvision's libjpeg-turbo decoder in batches, on the GPU with
nvJPEG when `device` is CUDA; other formats through ``decode_image``, or PIL for BMP/PPM/TIFF),
resizes each so its shorter side is S and centre-crops it, and writes the array to
:func:`image_cache_dir`. Later jobs memory-map that file: no decoding, and every trial of the
node shares one copy in the page cache.

A cache entry lives in a folder per (source folder, S) and is named by a fingerprint of the
file list: every file's relative path, size and modification time, in order. Adding,
removing, replacing or touching a file changes the fingerprint, so the next job decodes
again and replaces the stale entry. Two jobs that start together take a file lock; the
first decodes and publishes with an atomic rename, the second waits and maps the result.

torchvision is imported when something is decoded: it costs every process that imports it
about two seconds of CPU, which a job on the digits, or one that maps a cache entry, need not
pay.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.data.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "decode_images",
    "image_cache_dir",
    "list_images",
    "load_images",
    "user_cache_dir",
]

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_PIL_SUFFIXES = (".ppm", ".bmp", ".pgm", ".tif", ".tiff")  # formats torchvision cannot read
_JPEG_MAGIC = b"\xff\xd8\xff"
_CHUNK = 256  # files per decode batch: bounds memory, and one nvJPEG call on CUDA
_CACHE_FORMAT = "1"  # bump when the stored layout or the resizing changes


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mate-orchestrator``, by default ``~/.cache/mate-orchestrator``."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "mate-orchestrator"


def image_cache_dir() -> Path:
    """Where decoded images are cached: ``$MATE_IMAGE_CACHE``, else ``user_cache_dir()/images``.

    Point it at a node-local disk where the home directory is shared between nodes.
    """
    override = os.environ.get("MATE_IMAGE_CACHE")
    return Path(override).expanduser() if override else user_cache_dir() / "images"


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively), as sorted paths relative to it."""
    found = []
    for parent, _, names in os.walk(folder):
        rel = os.path.relpath(parent, folder)
        prefix = "" if rel == "." else rel + os.sep
        found += [prefix + n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def load_images(
    folder: Path, files: Sequence[str], size: int, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``folder/files[i]`` decoded to RGB, fitted to `size` px: uint8 [N, 3, size, size] on CPU.

    Memory-mapped from the node's cache, decoding (on `device`) only when the cache has no
    entry for this exact file list. Raises :class:`DataError` naming an unreadable file.
    """
    folder = Path(folder).absolute()
    prefix = f"{folder}{os.sep}"
    paths = [prefix + f for f in files]
    slot = image_cache_dir() / f"{folder.parent.name}-{folder.name}-{size}px-{_digest(folder)}"
    try:
        entry = slot / f"{_fingerprint(paths, files, size)}.npy"
        slot.mkdir(parents=True, exist_ok=True)
        if not entry.exists():
            with _locked(slot / "lock"):
                if not entry.exists():  # nobody built it while we waited
                    _build(entry, paths, size, device)
        return torch.from_numpy(np.load(entry, mmap_mode="c"))  # copy-on-write: pages shared
    except OSError as err:  # a file is missing, or the cache directory is not writable
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing is not None:
            raise DataError(f"cannot read {missing}: no such file") from None
        warnings.warn(f"image cache unusable ({err}); decoding in memory", stacklevel=2)
        return decode_images(paths, size, device=device)


def decode_images(
    paths: Sequence[str], size: int, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Decode without the cache: uint8 [N, 3, size, size] on CPU (what a cache entry holds)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    _decode_into(out, paths, size, device)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------
# The cache


def _digest(text: object) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()[:16]


def _fingerprint(paths: Sequence[str], files: Sequence[str], size: int) -> str:
    """Hash of the format, the size and every file's relative path, byte size and mtime."""
    lines = [f"{_CACHE_FORMAT}\0{size}"]
    for path, name in zip(paths, files, strict=True):
        st = os.stat(path)
        lines.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (released when the process dies, too)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(entry: Path, paths: Sequence[str], size: int, device: torch.device | str) -> None:
    """Decode into ``entry.partial``, then rename it to `entry`; drop the slot's stale files."""
    for stale in entry.parent.iterdir():
        if stale.name != "lock":
            stale.unlink()
    partial = entry.with_suffix(".partial")
    _log.info("decoding %d images once into %s", len(paths), entry)
    try:
        out = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size)
        )
        _decode_into(out, paths, size, device)
        out.flush()
        del out
        os.replace(partial, entry)
    finally:
        partial.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# Decoding

_LOCATION = re.compile(r"^\w+, \S+:\d+, ")  # torchvision's "decode_jpeg, file.cpp:171, "


def _decode_into(
    out: np.ndarray, paths: Sequence[str], size: int, device: torch.device | str
) -> None:
    """Fill `out` [N, 3, size, size] uint8 with the fitted images, chunk by chunk.

    On the CPU, chunks run on ``torch.get_num_threads()`` threads (the decoders release the
    GIL); on CUDA one chunk at a time, each one batched nvJPEG call.
    """
    device = torch.device(device)
    starts = range(0, len(paths), _CHUNK)

    def fill(start: int) -> None:
        chunk = paths[start : start + _CHUNK]
        out[start : start + len(chunk)] = _decode_chunk(chunk, size, device).numpy()

    workers = 1 if device.type == "cuda" else max(1, torch.get_num_threads())
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders for TorchCodec's, which decode
        # 32 px JPEGs about half as fast on the CPU here (README, Data).
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        if workers == 1:
            for start in starts:
                fill(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fill, starts))


def _decode_chunk(paths: Sequence[str], size: int, device: torch.device) -> torch.Tensor:
    """uint8 [n, 3, size, size] on CPU: JPEGs in one batched call on `device`, others singly."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg  # noqa: PLC0415  (module doc)

    data = [_read(p) for p in paths]
    images: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [i for i, d in enumerate(data) if bytes(d[:3].tolist()) == _JPEG_MAGIC]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: name it
            decoded = [_decode_one(paths[i], decode_jpeg, data[i]) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    for i, path in enumerate(paths):
        if images[i] is None:
            if path.lower().endswith(_PIL_SUFFIXES):
                images[i] = _decode_pil(path)
            else:
                images[i] = _decode_one(path, decode_image, data[i])
    return torch.stack([_fit(image, size).cpu() for image in images])


def _read(path: str) -> torch.Tensor:
    from torchvision.io import read_file  # noqa: PLC0415  (module doc)

    try:
        return read_file(path)
    except RuntimeError as err:
        raise DataError(f"cannot read {path}: {_LOCATION.sub('', str(err))}") from None


def _decode_one(path: str, decoder, data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode  # noqa: PLC0415  (module doc)

    try:
        return decoder(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        message = _LOCATION.sub("", str(err)).splitlines()[0]
        raise DataError(f"cannot decode {path}: {message}") from None


def _decode_pil(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)
    except OSError as err:
        raise DataError(f"cannot decode {path}: {err}") from None


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size]: shorter side resized to `size` (antialiased bilinear,
    like PIL), then centre-cropped."""
    from torchvision.transforms.v2 import functional as TF  # noqa: PLC0415  (module doc)

    if image.shape[-2:] == (size, size):
        return image
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
