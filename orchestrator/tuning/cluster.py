"""Starting or joining the Ray cluster a sweep runs on, and checking its address first."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import ray
from ray._private import ray_constants
from ray._private.services import canonicalize_bootstrap_address_or_die

from orchestrator.entities.errors import ClusterUnavailable, first_line
from orchestrator.entities.names import LOCAL_HOST
from orchestrator.stores.preflight import CONNECT_TIMEOUT_S, error_reason
from trainer.config import ConfigError

__all__ = ["check_ray_address", "init_ray", "join_ray"]

# Asks the GCS for the cluster id with Ray's connect timeouts shortened; in a child process,
# because Ray reads those settings once per process.
_GCS_PROBE = (
    "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]).cluster_id"
)
_GCS_PROBE_ENV = {"RAY_gcs_rpc_server_connect_timeout_s": "1", "RAY_py_gcs_connect_timeout_s": "2"}
_GCS_PROBE_TIMEOUT_S = 4 * CONNECT_TIMEOUT_S


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None
) -> None:
    """Join the cluster at `address`, or start a local Ray whose processes listen on
    127.0.0.1 only (ClusterUnavailable, one line, when it does not start)."""
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
    except Exception as err:  # Ray raises bare Exception, OSError, RuntimeError, ...
        raise ClusterUnavailable(_start_failure(err)) from err
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_enabled


def _start_failure(err: Exception) -> str:
    """One line on why a local Ray did not start: Ray's reason, with the way out where it is
    a temp dir too deep for the unix sockets Ray puts there."""
    reason = first_line(err)
    advice = "; set RAY_TMPDIR to a shorter directory" if "AF_UNIX path length" in reason else ""
    return f"a local Ray did not start: {reason}{advice}"


def join_ray(address: str) -> None:
    """Connect to the cluster at `address`; a refusal (a version or token mismatch) is a
    ConfigError."""
    try:
        init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None


def _host_port(address: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None or parts.path or parts.username:
        raise ConfigError(f"--address is {address!r}, but must be HOST:PORT of a Ray head node")
    return host, port


def _resolve_auto(address: str) -> str:
    """``auto``: the cluster `ray start` last started on this machine."""
    if address != "auto":
        return address
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as err:
        raise ConfigError(f"--address is 'auto', but {error_reason(err)}") from None


def check_ray_address(address: str) -> str:
    """The cluster's bootstrap address once its head node has answered. Refuses Ray Client
    addresses, unreachable hosts and ports where no Ray head listens (where ``ray.init``
    would retry for minutes)."""
    if address.startswith("ray://"):
        raise ConfigError(
            f"--address is {address!r}, but Ray Client (ray://) is not supported: run "
            "`orchestrate launch` on a node of the cluster with --address HEAD_IP:6379"
        )
    address = _resolve_auto(address)
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address} (--address): {error_reason(err)}"
        ) from None
    try:
        answered = (
            subprocess.run(
                [sys.executable, "-c", _GCS_PROBE, address],
                env={**os.environ, **_GCS_PROBE_ENV},
                capture_output=True,
                timeout=_GCS_PROBE_TIMEOUT_S,
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        answered = False
    if not answered:
        raise ConfigError(
            f"{address} (--address) accepts connections, but no Ray head node answered within "
            f"{_GCS_PROBE_TIMEOUT_S:.0f} s: is it the head's GCS port (6379 by default), and "
            "do RAY_AUTH_MODE/RAY_AUTH_TOKEN match the cluster's?"
        )
    return address
