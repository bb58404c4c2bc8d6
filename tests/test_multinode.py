"""A sweep on a two-node Ray cluster (docs/design.md §5, `launch --address`), and one that
loses a node.

Each node is a test host of its own: a network namespace joined to the other by a veth pair
(addresses that exist only inside the two namespaces, so no traffic leaves this machine). The
head advertises one CPU and no GPU, the worker one CPU and two GPUs (there are none: Ray
only hands out their ids, and the trials' `train.device: auto` falls back to the CPU). Both
nodes share this machine's file system, which stands for the shared sweep storage. Needs
root for `ip netns`; skipped where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.entities.sweep import SweepRecord
from orchestrator.tuning.tuner import cluster_slots
from sweep_helpers import child_runs, short_digits_space, sweep_args
from trainer.metrics import TRAIN_LOSS

BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP, PORT = "10.231.0.1", "10.231.0.2", 6379
ADDRESS = f"{HEAD_IP}:{PORT}"
WORKER_GPUS = 2
START_TIMEOUT = 90  # s, for a node to come up and the worker to join
SWEEP_TIMEOUT = 300  # s, for one sweep (2 CPU cores shared with other work)

# Connects to the cluster and prints its alive nodes once the worker has joined.
WAIT_FOR_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) == 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({n["NodeManagerAddress"]: n["NodeID"] for n in nodes}))
"""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert not check or done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
    return done


@dataclass
class Cluster:
    head_ns: str
    env: dict[str, str]
    node_ids: dict[str, str]  # node IP -> Ray node id
    worker_ns: str

    def command(self, workdir: Path, space: Path, name: str, *options: str) -> list[str]:
        """`orchestrate launch --address` in the head's namespace."""
        command = [str(BIN / "orchestrate"), "launch", "--space", str(space), "--address"]
        command += [ADDRESS, *sweep_args(workdir, name), *options]
        return ["ip", "netns", "exec", self.head_ns, *command]

    def launch(self, workdir: Path, space: Path, name: str, *options: str):
        return subprocess.run(
            self.command(workdir, space, name, *options),
            cwd=workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=SWEEP_TIMEOUT,
        )


def _namespaces(head_ns: str, worker_ns: str) -> None:
    """Two namespaces joined by a veth pair, loopback up in each."""
    head_if, worker_if = f"{head_ns}v", f"{worker_ns}v"  # interface names: <= 15 characters
    _run("ip", "link", "add", head_if, "type", "veth", "peer", "name", worker_if)
    for ns, interface, ip in ((head_ns, head_if, HEAD_IP), (worker_ns, worker_if, WORKER_IP)):
        _run("ip", "link", "set", interface, "netns", ns)
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", interface)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "set", interface, "up")


def _start_node(ns: str, options: list[str], temp_dir: str, log: Path, env: dict[str, str]):
    """`ray start --block` in `ns`, in a session (and process group) of its own."""
    command = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats"]
    command += ["--temp-dir", temp_dir, "--object-store-memory", str(200 * 2**20), *options]
    with log.open("w") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_started(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None, f"ray start exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"ray start timed out:\n{log.read_text()}"
        time.sleep(0.5)


def _stop(processes: list[subprocess.Popen], namespaces: list[str]) -> None:
    """SIGTERM each `ray start` (it stops its node's Ray processes), then SIGKILL whatever is
    left: its process group, then every process still in the namespaces; then the namespaces."""
    for process in reversed(processes):  # the worker first
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
    for ns in namespaces:
        deadline = time.monotonic() + 30
        while _kill_all(ns) and time.monotonic() < deadline:
            time.sleep(0.2)
        _run("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair along


def _kill_all(ns: str) -> int:
    """SIGKILL every process in namespace `ns` (Ray's workers run in process groups of their
    own); returns how many there were."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    return len(pids)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    logs = tmp_path_factory.mktemp("ray-nodes")
    tag = f"mt{os.getpid() % 100000}"
    head_ns, worker_ns = f"{tag}h", f"{tag}w"
    made = _run("ip", "netns", "add", head_ns, check=False)
    if made.returncode != 0:
        if any(s in made.stderr for s in ("Operation not permitted", "Permission denied")):
            pytest.skip(f"cannot create network namespaces: {made.stderr.strip()}")
        pytest.fail(f"ip netns add {head_ns}: {made.stderr.strip()}")
    namespaces = [head_ns]
    processes: list[subprocess.Popen] = []
    # Short paths: Ray's unix sockets live under the temp dir (108 characters at most).
    temp_dirs = [tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp") for _ in range(2)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env |= {
        "RAY_AUTH_MODE": "token",  # one token for the head, the worker and the driver
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, no 30 s drain
        # A killed node is declared dead after 3 missed 1 s health checks (default 5 x 3 s).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    try:
        _run("ip", "netns", "add", worker_ns)
        namespaces.append(worker_ns)
        _namespaces(head_ns, worker_ns)
        head_options = ["--head", "--node-ip-address", HEAD_IP, "--port", str(PORT)]
        head_options += ["--num-cpus", "1", "--num-gpus", "0", "--include-dashboard=false"]
        head = _start_node(head_ns, head_options, temp_dirs[0], logs / "head.log", env)
        processes.append(head)
        _wait_started(head, logs / "head.log")
        worker_options = ["--address", ADDRESS, "--node-ip-address", WORKER_IP]
        worker_options += ["--num-cpus", "1", "--num-gpus", str(WORKER_GPUS)]
        worker = _start_node(worker_ns, worker_options, temp_dirs[1], logs / "worker.log", env)
        processes.append(worker)
        _wait_started(worker, logs / "worker.log")
        wait = ["ip", "netns", "exec", head_ns, sys.executable, "-c", WAIT_FOR_NODES]
        nodes = subprocess.run(
            [*wait, ADDRESS, str(START_TIMEOUT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 60,
        )
        assert nodes.returncode == 0, nodes.stdout + nodes.stderr
        node_ids = json.loads(nodes.stdout.strip().splitlines()[-1])
        assert sorted(node_ids) == [HEAD_IP, WORKER_IP], nodes.stdout + nodes.stderr
        yield Cluster(head_ns, env, node_ids, worker_ns)
    finally:
        _stop(processes, namespaces)
        _run("ip", "link", "del", f"{head_ns}v", check=False)  # if it never left this namespace
        for directory in temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def _space(directory: Path, *, num_samples: int, max_epochs: int, gpu: int) -> Path:
    """The short digits space without pruning (every trial runs its full budget)."""
    path = short_digits_space(directory, max_epochs=max_epochs, num_samples=num_samples)
    data = yaml.safe_load(path.read_text())
    data["search"]["pruner"]["kind"] = "none"
    data["search"]["resources"] = {"cpu": 1, "gpu": gpu}
    path.write_text(yaml.safe_dump(data))
    return path


def _trial_nodes(workdir: Path, name: str, expected: int) -> list[str]:
    runs = child_runs(SweepRecord.load(name, workdir / "sweeps"))
    assert len(runs) == expected
    assert {r.info.status for r in runs} == {"FINISHED"}
    return [r.data.tags["node_id"] for r in runs]


def test_slots_are_counted_node_by_node():
    head, worker = {"CPU": 1.0}, {"CPU": 1.0, "GPU": float(WORKER_GPUS)}
    # The head has a CPU but no GPU, the worker GPUs but one CPU: one GPU trial at a time.
    assert cluster_slots({"cpu": 1.0, "gpu": 1.0}, [head, worker]) == 1
    assert cluster_slots({"cpu": 1.0, "gpu": 0.0}, [head, worker]) == 2
    assert cluster_slots({"cpu": 1.0, "gpu": 0.5}, [{"CPU": 8.0, "GPU": 2.0}]) == 4
    assert cluster_slots({"cpu": 0.1, "gpu": 0.0}, [{"CPU": 0.3}]) == 3


def test_cpu_trials_run_on_both_nodes(cluster, tmp_path):
    # Both nodes' first actors start at once (the sweep's concurrency limit lets Tune stage
    # two trials); a trial outlasts the gap between them, else Tune would hand the second
    # trial to the first actor (reuse_actors) and the other node would get none.
    space = _space(tmp_path, num_samples=4, max_epochs=4, gpu=0)
    result = cluster.launch(tmp_path, space, "cpu", "--gpus", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    nodes = _trial_nodes(tmp_path, "cpu", 4)
    assert set(nodes) == set(cluster.node_ids.values()), (nodes, cluster.node_ids)


def test_gpu_trials_run_only_where_gpus_are(cluster, tmp_path):
    space = _space(tmp_path, num_samples=2, max_epochs=1, gpu=1)
    result = cluster.launch(tmp_path, space, "gpu", "--gpus", str(WORKER_GPUS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{WORKER_GPUS} GPU(s)" in result.stdout
    assert set(_trial_nodes(tmp_path, "gpu", 2)) == {cluster.node_ids[WORKER_IP]}


def test_more_gpus_than_the_cluster_has_is_refused(cluster, tmp_path):
    space = _space(tmp_path, num_samples=2, max_epochs=1, gpu=1)
    result = cluster.launch(tmp_path, space, "too-many", "--gpus", str(WORKER_GPUS + 1))
    assert result.returncode == 2, result.stdout + result.stderr
    message = f"--gpus is {WORKER_GPUS + 1}, but the cluster at {ADDRESS} has {WORKER_GPUS} GPU(s)"
    assert message in result.stderr
    assert not (tmp_path / "sweeps" / "too-many").exists()


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow  # and last in this module: it kills the worker node
def test_trials_of_a_lost_node_resume_on_the_survivor(cluster, tmp_path):
    # Trials long enough that the worker's first actor is up before the head's first trial
    # ends (else Tune hands the head's actor the next trial, and the worker gets none).
    epochs, num_samples = 8, 3
    space = _space(tmp_path, num_samples=num_samples, max_epochs=epochs, gpu=0)
    sweep_dir = tmp_path / "sweeps" / "lost"
    launch = subprocess.Popen(
        cluster.command(tmp_path, space, "lost", "--gpus", "0"),
        cwd=tmp_path,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + SWEEP_TIMEOUT

    def on_worker() -> list[Path]:
        return [
            d
            for d in sweep_dir.glob("trial_*")
            if any(r["node_ip"] == WORKER_IP for r in _results(d))
        ]

    while not on_worker():
        assert launch.poll() is None, launch.stdout.read()
        assert time.monotonic() < deadline, "no trial reported from the worker node"
        time.sleep(0.2)
    # The node is lost with everything on it. Killing its raylet alone left the trial's
    # actor running long enough to finish its 8 short epochs on the dead node.
    assert _kill_all(cluster.worker_ns)
    output, _ = launch.communicate(timeout=SWEEP_TIMEOUT)
    assert launch.returncode == 0, output
    victims = on_worker()
    moved = [d for d in victims if {r["node_ip"] for r in _results(d)} == {WORKER_IP, HEAD_IP}]
    where = {d.name: [(r["epoch"], r["node_ip"]) for r in _results(d)] for d in victims}
    assert len(moved) == 1, f"the lost node's trial never ran on the head: {where}\n{output}"
    victim = moved[0]
    for trial_dir in sweep_dir.glob("trial_*"):  # (each epoch once: MLflow, below)
        assert _results(trial_dir)[-1]["epoch"] == epochs
    on_head = [r for r in _results(victim) if r["node_ip"] == HEAD_IP]
    # Restored from its last checkpoint on the head, not started again from epoch 1.
    assert on_head[0]["iterations_since_restore"] == 1 and on_head[0]["epoch"] >= 2
    record = SweepRecord.load("lost", tmp_path / "sweeps")
    runs = child_runs(record)
    assert len(runs) == num_samples and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(record.tracking_uri)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, TRAIN_LOSS)]
        assert steps == list(range(1, epochs + 1)), steps
    number = json.loads((victim / "params.json").read_text())["optuna_trial_number"]
    (moved_run,) = [r for r in runs if r.data.tags["optuna_trial_number"] == str(number)]
    assert moved_run.data.tags["node_id"] == cluster.node_ids[HEAD_IP]
    trials = optuna.load_study(study_name="lost", storage=record.study_storage).trials
    all_epochs = [list(range(1, epochs + 1))] * num_samples
    assert [sorted(t.intermediate_values) for t in trials] == all_epochs
