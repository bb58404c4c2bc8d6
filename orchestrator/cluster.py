"""Starting or joining the Ray cluster a sweep runs on."""

from __future__ import annotations

import os

import ray

__all__ = ["LOCAL_HOST", "init_ray"]

LOCAL_HOST = "127.0.0.1"


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None
) -> None:
    """Join the cluster at `address`, or start a local Ray bound to 127.0.0.1 only."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Keep every Ray process of a single-node instance on the loopback interface.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",  # a new instance, never some other Ray found on the machine
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address=LOCAL_HOST,
    )
