"""Starting or joining the Ray cluster a sweep runs on."""

from __future__ import annotations

import ray
from ray._private import ray_constants

__all__ = ["LOCAL_HOST", "init_ray"]

LOCAL_HOST = "127.0.0.1"


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None
) -> None:
    """Join the cluster at `address`, or start a local Ray whose processes listen on
    127.0.0.1 only."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Ray replaces a node address of 127.0.0.1 by this machine's network address, and its
    # servers then listen on every interface, unless it believes this machine cannot join a
    # cluster (its Windows/macOS default, read from ray_constants when the node starts).
    # Say so while the local node starts; its processes are given 127.0.0.1 explicitly.
    cluster_enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",  # a new instance, never some other Ray found on the machine
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address=LOCAL_HOST,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_enabled
