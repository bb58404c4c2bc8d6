"""What a sweep shows, read back from one real multi-objective sweep (`results_sweep`): the
launch terminal, `status`, per-trial figures, the HTML report, `promote --pick` and the
dashboard."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import EXIT_INTERRUPTED, main
from orchestrator.report.panels import build_panels
from orchestrator.selection.trials import pareto_trials
from orchestrator.stores.study import load_study
from orchestrator.workflows.status import sweep_rows
from results_fixture import (
    MAX_EPOCHS,
    NAME,
    NUM_SAMPLES,
    ORCHESTRATE,
    free_port,
    stop,
    wait_for_http,
)
from sweep_helpers import child_runs, interruptible
from trainer import metrics as M

ACC, GFLOPS = "val/mean_exit_acc", "val/anytime_gflops"
PANELS = [
    f"Optimisation history: {ACC}",
    f"Optimisation history: {GFLOPS}",
    "Parallel coordinates of the searched parameters",
    "Parameter importances",
    "Per-exit accuracy of the top trials",
    "Pareto front: accuracy against GFLOPs at the operating point",
]


def _storage(sweep) -> list[str]:
    return ["--storage", str(sweep.workdir / "sweeps")]


def _runs_by_number(sweep) -> dict[int, object]:
    return {int(r.data.tags["optuna_trial_number"]): r for r in child_runs(sweep.record)}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_launch_prints_its_own_lines_only(results_sweep):
    sweep, record = results_sweep, results_sweep.record
    study = load_study(record)
    pareto = [t.number for t in pareto_trials(study)]
    directory = sweep.workdir / "sweeps" / NAME
    lines = sweep.stdout.splitlines()
    assert sweep.stderr == ""
    assert lines[:5] == [
        f"sweep {NAME}: {NUM_SAMPLES} trials of {sweep.space} on a local Ray (127.0.0.1), "
        f"0 GPU(s); tracking {record.tracking_uri}",
        f"objectives: {ACC} (max), {GFLOPS} (min)",
        "search.pruner asha does not apply to a multi-objective search (Optuna prunes on one "
        "objective only): every trial runs its full budget",
        f"log: {directory / 'sweep.log'} (Ray, MLflow and Optuna messages; --verbose prints "
        "them here)",
        f"trials {NUM_SAMPLES}/{NUM_SAMPLES} done: {NUM_SAMPLES} finished 0 pruned 0 failed, "
        f"0 running | Pareto set of {len(pareto)} trial{'s' if len(pareto) > 1 else ''}: "
        + ", ".join(map(str, pareto)),
    ]
    assert lines[5].strip() == f"top 5 of {NAME}"
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    pieces = [[cell.strip() for cell in line.split("┃")[1:-1]] for line in lines[7:rule]]
    header = ["".join(column) for column in zip(*pieces, strict=True)]  # headers may break
    assert header == ["trial", "state", "epochs", ACC, GFLOPS, "params"]
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines[rule + 1 : end]]
    rows = [row for row in cells if row[0]]  # a long params cell wraps onto more lines
    expected = sorted(study.trials, key=lambda t: (t.number not in pareto, -t.values[0]))
    for row, trial in zip(rows, expected, strict=True):
        star = "*" if trial.number in pareto else ""
        acc, gflops = trial.values
        assert row[:5] == [
            f"{trial.number}{star}",
            "COMPLETE",
            str(MAX_EPOCHS),
            f"{acc:.4f}",
            f"{gflops:.4g}",
        ]
    assert lines[end + 1].strip().startswith("* Pareto set:")
    assert lines[end + 2 :] == [
        f"report: {directory / 'report.html'}",
        "next:",
        f"  orchestrate status {NAME}",
        f"  orchestrate ui          # then http://127.0.0.1:5000/#/experiments/"
        f"{record.experiment_id}/runs?workflowType=machine_learning",
        f"  orchestrate promote {NAME} --register {NAME}",
    ]
    log = (directory / "sweep.log").read_text()
    for library_line in ("Started a local Ray instance", "View detailed results here"):
        assert library_line in log


def test_status_shows_the_pareto_set(results_sweep):
    result = CliRunner().invoke(main, ["status", NAME, *_storage(results_sweep)])
    assert result.exit_code == 0, result.output
    pareto = pareto_trials(load_study(results_sweep.record))
    summary = ", ".join(str(t.number) for t in pareto)
    assert result.output.splitlines()[-2:] == [
        f"{NUM_SAMPLES}/{NUM_SAMPLES} trials (complete {NUM_SAMPLES}); Pareto set of "
        f"{len(pareto)} trial{'s' if len(pareto) > 1 else ''}: {summary}",
        f"MLflow: {results_sweep.record.tracking_uri}, parent run "
        f"{results_sweep.record.parent_run_id}",
    ]
    for t in pareto:
        assert re.search(rf"│\s+{t.number}\* │ COMPLETE", result.output)


def test_trial_runs_have_figures_and_the_pareto_set_is_tagged(results_sweep):
    record = results_sweep.record
    client = MlflowClient(record.tracking_uri)
    pareto = {t.number for t in pareto_trials(load_study(record))}
    runs = _runs_by_number(results_sweep)
    assert sorted(runs) == list(range(NUM_SAMPLES))
    for number, run in runs.items():
        figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert figures == ["figures/anytime.png", "figures/exit_accuracy.png"]
        for path in figures:
            local = client.download_artifacts(run.info.run_id, path, str(results_sweep.workdir))
            width, height = _png_size(Path(local).read_bytes())
            assert width > 300 and height > 200
        assert (run.data.tags.get("pareto") == "true") == (number in pareto)
    parent = client.get_run(record.parent_run_id)
    assert parent.data.tags["pareto_run_ids"].split(",") == [
        runs[t.number].info.run_id for t in pareto_trials(load_study(record))
    ]
    assert sorted(a.path for a in client.list_artifacts(record.parent_run_id)) == [
        "report.html",
        "space.yaml",
    ]
    kind = client.get_experiment(record.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"


def test_anytime_curve_of_a_trial_matches_its_metrics(results_sweep):
    """θ=0 sends every sample out at exit 1, θ>1 through the last exit, θ=0.9 is the
    operating point: the saved curve must agree with the metrics the trial logged."""
    record = results_sweep.record
    client = MlflowClient(record.tracking_uri)
    run = next(r for r in child_runs(record) if r.data.tags.get("pareto") == "true")
    local = client.download_artifacts(
        run.info.run_id, "checkpoint/anytime.json", str(results_sweep.workdir)
    )
    curve = M.AnytimeCurve(**json.loads(Path(local).read_text()))
    metrics = run.data.metrics
    last = len(json.loads(run.data.params["model.exits"]))
    assert curve.accuracy[0] == pytest.approx(metrics[M.exit_acc(1)])
    assert curve.relative_cost[0] == pytest.approx(
        metrics[M.exit_gflops(1)] / metrics[M.exit_gflops(last)]
    )
    assert curve.accuracy[-1] == pytest.approx(metrics[M.exit_acc(last)])
    assert curve.relative_cost[-1] == pytest.approx(1.0)
    at_operating = min(range(len(curve.thresholds)), key=lambda i: abs(curve.thresholds[i] - 0.9))
    assert curve.operating_threshold == 0.9
    assert curve.accuracy[at_operating] == pytest.approx(metrics[M.ANYTIME_ACC])
    full = metrics[M.exit_gflops(last)]
    assert curve.relative_cost[at_operating] == pytest.approx(metrics[M.ANYTIME_GFLOPS] / full)


class _Page(HTMLParser):
    """Headings, image sources and anything that would load from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe") or (attrs.get("href") or "").startswith("http"):
            self.external.append(tag)

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_report_command_writes_one_self_contained_file(results_sweep, tmp_path):
    args = ["report", NAME, "--output", str(tmp_path), *_storage(results_sweep)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'report.html'}")
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    best = max(pareto_trials(load_study(results_sweep.record)), key=lambda t: t.values[0])
    panels = [*PANELS, f"Teacher weights of trial {best.number}"]  # MATE reports them
    assert page.headings == panels
    assert len(page.images) == len(panels) and not page.external
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        width, height = _png_size(base64.b64decode(src.removeprefix(prefix)))
        assert width > 300 and height > 200


def test_report_shows_the_teacher_weights_the_best_trial_reports(results_sweep):
    record = results_sweep.record
    best = max(pareto_trials(load_study(record)), key=lambda t: t.values[0])
    run = _runs_by_number(results_sweep)[best.number]
    exits = range(1, len(json.loads(run.data.params["model.exits"])) + 1)
    weights = [[run.data.metrics[M.teacher_weight(j, k)] for k in exits] for j in exits]
    assert all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in weights)  # softmax(a_j)
    panels = build_panels(record)
    assert panels[-1].title == f"Teacher weights of trial {best.number}"
    assert _png_size(panels[-1].image)[0] > 200


def test_promote_picks_the_most_accurate_trial_under_a_gflops_budget(results_sweep):
    record = results_sweep.record
    complete = load_study(record).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    budget = sorted(t.values[1] for t in complete)[len(complete) // 2]
    expected = max((t for t in complete if t.values[1] <= budget), key=lambda t: t.values[0])
    rule = f"{GFLOPS}<={budget!r}"
    args = ["promote", NAME, "--pick", rule, "--epochs", "1", *_storage(results_sweep)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"promoting trial {expected.number} of {NAME} (best {ACC} with {GFLOPS} <= {budget:g})"
    )
    client = MlflowClient(record.tracking_uri)
    final = client.search_runs(
        [record.experiment_id], f"tags.promoted_from_trial = '{expected.number}'"
    )
    assert len(final) == 1 and final[0].info.status == "FINISHED"
    # Unregistered, it names the logged model and how to load and serve it.
    uri = re.search(r"logged model (models:/\S+)", result.output).group(1)
    assert f'mlflow.pyfunc.load_model("{uri}")' in result.output
    assert f"mlflow models serve -m {uri} " in result.output
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.source_run_id == final[0].info.run_id
    # MLflow's own messages (its pickle advisory) go to the sweep's log, as in `launch`.
    advisory = "WARNING mlflow.pytorch: Saving pytorch model by Pickle"
    assert advisory not in result.output
    assert advisory in (record.directory / "sweep.log").read_text()


def test_promote_interrupted_ends_130_with_its_run_killed_and_nothing_registered(results_sweep):
    record = results_sweep.record
    client = MlflowClient(record.tracking_uri)
    before = {r.info.run_id for r in client.search_runs([record.experiment_id])}
    args = [
        "promote",
        NAME,
        "--epochs",
        "500",
        "--register",
        "interrupted",
        *_storage(results_sweep),
    ]
    process = subprocess.Popen(
        interruptible([str(ORCHESTRATE), *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:  # until the final job has logged an epoch
        new = [r for r in client.search_runs([record.experiment_id]) if r.info.run_id not in before]
        if new and new[0].data.metrics:
            break
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the final job logged no epoch"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert output.rstrip().endswith("interrupted: the final job's MLflow run is KILLED")
    assert "Traceback" not in output
    assert client.get_run(new[0].info.run_id).info.status == "KILLED"
    assert client.search_registered_models("name = 'interrupted'") == []


def test_promote_rejects_a_bad_pick_before_training(results_sweep):
    record = results_sweep.record
    runs_before = len(MlflowClient(record.tracking_uri).search_runs([record.experiment_id]))
    args = ["promote", NAME, "--pick", "val/exit1/acc>=0.5", *_storage(results_sweep)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output == (
        "Error: --pick is 'val/exit1/acc>=0.5', but val/exit1/acc is not an objective of this "
        f"sweep ({ACC}, {GFLOPS})\n"
    )
    assert len(MlflowClient(record.tracking_uri).search_runs([record.experiment_id])) == runs_before


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # TCP_LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_dashboard_serves_the_study_on_loopback_only(results_sweep):
    port = free_port()
    process = subprocess.Popen(
        [str(ORCHESTRATE), "dashboard", NAME, "--port", str(port), *_storage(results_sweep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        studies = json.loads(wait_for_http(f"http://127.0.0.1:{port}/api/studies", process))
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop(process)
    (study,) = studies["study_summaries"]
    assert study["study_name"] == NAME
    assert study["directions"] == ["maximize", "minimize"]
    first_line = process.stdout.read().splitlines()[0]
    assert first_line == (
        f"optuna-dashboard for sweep {NAME} at http://127.0.0.1:{port}/dashboard/studies/"
        f"{study['study_id']} (Ctrl-C stops it)"
    )


def test_ui_and_dashboard_refuse_a_taken_port_or_unknown_host_before_starting(results_sweep):
    """One line and status 2 from both servers, in their own processes (`ui` execs MLflow's
    server, which would print its address, fail to bind and exit 0)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        commands = {
            "ui": ["ui", "--port", str(port), "--tracking-uri", results_sweep.record.tracking_uri],
            "dashboard": ["dashboard", NAME, "--port", str(port), *_storage(results_sweep)],
        }
        for command in commands.values():
            result = subprocess.run(
                [str(ORCHESTRATE), *command], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 2, result.stdout + result.stderr
            assert result.stdout == ""
            assert result.stderr == (
                f"Error: --port is {port}, but 127.0.0.1:{port} cannot be listened on "
                "(Address already in use); choose another with --port\n"
            )
    unknown = [
        "ui",
        "--host",
        "no-such-host.invalid",
        "--tracking-uri",
        results_sweep.record.tracking_uri,
    ]
    result = subprocess.run(
        [str(ORCHESTRATE), *unknown], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: --host is 'no-such-host.invalid': ")
    assert result.stderr.count("\n") == 1


def test_a_moved_sweep_is_read_where_it_is_and_nothing_is_written_where_it_was(
    results_sweep, tmp_path
):
    """The sweeps folder moved (or mounted elsewhere): `status`, `report` and `resume` of the
    finished sweep read it where it is now; where it was gets nothing (an empty optuna.db
    and a traceback before). A study file gone is one line, and a row of the listing."""
    record = results_sweep.record
    away, moved = tmp_path / "away", tmp_path / "moved"
    shutil.move(record.directory, away)
    try:
        shutil.copytree(away, moved / NAME)
        storage = ["--storage", str(moved)]
        status = CliRunner().invoke(main, ["status", NAME, *storage])
        assert status.exit_code == 0, status.output
        assert f"{NUM_SAMPLES}/{NUM_SAMPLES} trials" in status.output
        assert sweep_rows(moved)[0][2].startswith(f"{NUM_SAMPLES}/{NUM_SAMPLES}: ")
        report = CliRunner().invoke(main, ["report", NAME, *storage])
        assert report.exit_code == 0, report.output
        assert f"wrote {moved / NAME / 'report.html'}" in report.output
        resumed = CliRunner().invoke(main, ["resume", NAME, *storage])
        assert resumed.exit_code == 0, resumed.output
        assert f"sweep {NAME} had finished" in resumed.output
        assert not record.directory.exists()  # nothing was created where it was

        study_file = moved / NAME / "optuna.db"
        study_file.unlink()
        gone = CliRunner().invoke(main, ["status", NAME, *storage])
        assert gone.exit_code == 2
        assert gone.output == (
            f"Error: the sweep's study storage is 'sqlite:///{study_file}', but {study_file} "
            "does not exist\n"
        )
        assert sweep_rows(moved)[0][2].endswith(f"{study_file} does not exist")
        assert not study_file.exists()
    finally:
        shutil.rmtree(record.directory, ignore_errors=True)
        shutil.move(away, record.directory)
