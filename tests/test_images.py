"""trainer/images.py: batched decoding, the decode-once cache, its invalidation and locking."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.images import DataError, decode_images, list_images, load_images

SIZE = 16


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("MATE_IMAGE_CACHE", str(path))
    return path


def _write(folder: Path, count: int, start: int = 0) -> list[str]:
    """`count` JPEGs of distinct smooth colours (rows of a ramp) named 000.jpg, 001.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        img = np.full((SIZE, SIZE, 3), (8 * i % 256, 255 - 8 * i % 256, 128), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=95)
    return list_images(folder)


def _decodes(caplog) -> int:
    return sum("decoding" in r.getMessage() for r in caplog.records)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.name != "lock")


def test_load_images_equals_pil_and_keeps_file_order(tmp_path, cache):
    files = _write(tmp_path / "imgs", 40)
    images = load_images(tmp_path / "imgs", files, SIZE)
    pil = np.stack([np.asarray(Image.open(tmp_path / "imgs" / f)) for f in files])
    assert images.dtype == torch.uint8 and images.shape == (40, 3, SIZE, SIZE)
    assert np.array_equal(images.numpy(), pil.transpose(0, 3, 1, 2))  # same libjpeg-turbo


def test_decode_threads_fill_every_chunk_in_order(tmp_path):
    files = _write(tmp_path / "imgs", 600)  # three chunks of 256
    paths = [str(tmp_path / "imgs" / f) for f in files]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_images(paths, SIZE)
        torch.set_num_threads(3)
        three = decode_images(paths, SIZE)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(one[:, 0, 0, 0], decode_images(paths[::-1], SIZE)[:, 0, 0, 0].flip(0))


def test_second_load_maps_the_cache_without_decoding(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO, logger="trainer.images")
    files = _write(tmp_path / "imgs", 10)
    first = load_images(tmp_path / "imgs", files, SIZE)
    second = load_images(tmp_path / "imgs", files, SIZE)
    assert _decodes(caplog) == 1
    assert torch.equal(first, second)
    (entry,) = _entries(cache)
    assert entry.suffix == ".npy" and entry.stat().st_size > first.numel()
    assert load_images(tmp_path / "imgs", files, SIZE + 2).shape[-1] == SIZE + 2
    assert _decodes(caplog) == 2 and len(_entries(cache)) == 2  # one entry per size


def test_added_removed_or_touched_file_invalidates_the_entry(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO, logger="trainer.images")
    folder = tmp_path / "imgs"
    files = _write(folder, 10)
    load_images(folder, files, SIZE)

    files = _write(folder, 1, start=10)  # added
    assert load_images(folder, files, SIZE).shape[0] == 11
    (folder / "003.jpg").unlink()  # removed
    files = list_images(folder)
    assert load_images(folder, files, SIZE).shape[0] == 10
    before = load_images(folder, files, SIZE)
    os.utime(folder / "005.jpg", ns=(0, 10**18))  # touched: same bytes, new mtime
    assert torch.equal(load_images(folder, files, SIZE), before)
    # rewritten in place: new bytes, size and mtime
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "006.jpg", quality=50)
    changed = load_images(folder, files, SIZE)
    assert (changed[5].float().mean(dim=(1, 2)) - torch.tensor([1, 2, 3])).abs().max() < 3
    assert _decodes(caplog) == 5
    assert len(_entries(cache)) == 1  # stale entries are replaced, not kept


_RACE = textwrap.dedent(
    """
    import hashlib, logging, sys, time
    from pathlib import Path
    from trainer.images import list_images, load_images
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    folder, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:  # start together
        time.sleep(0.001)
    images = load_images(folder, list_images(folder), 16)
    print("sha", hashlib.sha256(images.numpy().tobytes()).hexdigest())
    """
)


def test_two_processes_starting_together_decode_once(tmp_path, cache):
    folder = tmp_path / "imgs"
    _write(folder, 30)
    for i in range(30, 600):  # enough work that both processes meet inside the build
        os.symlink(folder / f"{i % 30:03d}.jpg", folder / f"{i:03d}.jpg")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "MATE_IMAGE_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(folder), str(barrier), str(i)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(o.count("decoding 600 images") for o in outputs) == 1, outputs
    shas = {line for o in outputs for line in o.splitlines() if line.startswith("sha")}
    assert len(shas) == 1, outputs
    assert len(_entries(cache)) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jpg", b"\xff\xd8\xff\xe0 truncated", "Image is incomplete or truncated"),
        ("bad.png", b"not a png", "Unsupported image file"),
        ("bad.bmp", b"BM broken", "cannot identify image file"),
    ],
)
def test_corrupt_file_is_one_data_error_line_and_caches_nothing(
    tmp_path, cache, name, content, message
):
    files = _write(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        load_images(tmp_path / "imgs", [*files, name], SIZE)
    assert str(err.value).startswith(f"cannot decode {tmp_path / 'imgs' / name}: ")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert ".cpp" not in str(err.value)
    assert _entries(cache) == []


def test_unusable_cache_directory_decodes_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MATE_IMAGE_CACHE", str(blocker / "cache"))
    files = _write(tmp_path / "imgs", 3)
    with pytest.warns(UserWarning, match="image cache unusable"):
        images = load_images(tmp_path / "imgs", files, SIZE)
    assert images.shape == (3, 3, SIZE, SIZE)


def test_missing_file_is_a_data_error(tmp_path, cache):
    files = _write(tmp_path / "imgs", 2)
    with pytest.raises(DataError, match=r"cannot read .*gone.jpg: no such file"):
        load_images(tmp_path / "imgs", [*files, "gone.jpg"], SIZE)
