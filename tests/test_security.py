"""What the project starts listens on 127.0.0.1 only, keeps passwords out of process
arguments, and loads checkpoints without unpickling arbitrary objects."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from trainer.config import parse_job_config
from trainer.engine import CHECKPOINT_FILE, build_job, load_checkpoint, save_checkpoint

UI_START_TIMEOUT = 120  # s


def _parents() -> dict[int, int]:
    parents = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
            parents[int(status.parent.name)] = int(fields["PPid"])
    return parents


def _tree(root: int) -> set[int]:
    """`root` and every process below it."""
    parents, tree = _parents(), {root}
    grew = True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree}
        grew = not below <= tree
        tree |= below
    return tree


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the processes `pids` listen on."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw) if family == 4 else ipaddress.IPv6Address(raw)
            found.append((str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16)))
    return found


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def test_local_ray_listens_on_loopback_only(local_ray):
    @ray.remote
    def ping() -> int:
        return os.getpid()

    worker = ray.get(ping.remote())
    tree = _tree(os.getpid())
    assert worker in tree
    sockets = _listening(tree)
    assert sockets, "found no listening Ray process"
    assert [s for s in sockets if not _loopback(s[0])] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_listens_on_loopback_and_gets_the_store_url_by_environment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a password would travel the same way
    (tmp_path / "mlflow.db").touch()  # an empty database: the UI refuses a missing one
    port = _free_port()
    command = [str(Path(sys.executable).with_name("orchestrate")), "ui", "--port", str(port)]
    ui = subprocess.Popen(
        [*command, "--tracking-uri", uri],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT
        while not any(p == port for _, p in _listening(_tree(ui.pid))):
            assert ui.poll() is None, ui.stdout.read()
            assert time.monotonic() < deadline, "the UI did not start"
            time.sleep(0.5)
        tree = _tree(ui.pid)
        assert {a for a, p in _listening(tree) if p == port} == {"127.0.0.1"}
        environment = Path(f"/proc/{ui.pid}/environ").read_bytes().split(b"\0")
        assert f"MLFLOW_BACKEND_STORE_URI={uri}".encode() in environment
        for pid in tree:  # `ps` shows argv to every user of the machine
            with contextlib.suppress(OSError):
                assert uri not in Path(f"/proc/{pid}/cmdline").read_text()
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        output, _ = ui.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}" in output


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_checkpoints_load_without_unpickling_code(tmp_path):
    cfg = parse_job_config(
        {"dataset": {"name": "digits"}, "model": {"exits": [2, 4]}, "train": {"epochs": 1}}
    )
    job = build_job(cfg)
    save_checkpoint(job, tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    torch.save({**state, "extra": _RunsCode()}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(job, tmp_path)
