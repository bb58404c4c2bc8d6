"""The first-wave gate (orchestrator.tuning.first_wave) in real Ray actor processes: the first
trials start together, a late or retried actor is not held, a wave that never fills opens
at the timeout, and a gate that is gone holds and fails nothing."""

from __future__ import annotations

import inspect
import time

import ray

from orchestrator.tuning.first_wave import gate_first_wave


def started_at(config: dict) -> float:
    """A trial body: when it began."""
    return time.time()


@ray.remote(num_cpus=0)
class TrialProcess:
    """One process that runs trials one after another, as a reused Tune actor does."""

    def run(self, trainable, config: dict) -> tuple[float, float]:
        """(when the trial was handed to this process, when its body began)."""
        return time.time(), trainable(config)


def waited(process, trainable) -> float:
    """Seconds a trial on `process` waited at the gate."""
    handed, began = ray.get(process.run.remote(trainable, {}))
    return began - handed


def test_the_first_trials_start_when_the_whole_wave_is_up(local_ray):
    gated = gate_first_wave(started_at, size=2, timeout_s=60)
    first, second = TrialProcess.remote(), TrialProcess.remote()
    ray.get([first.__ray_ready__.remote(), second.__ray_ready__.remote()])
    early = first.run.remote(gated, {})
    time.sleep(2.0)  # the second actor's trial arrives two seconds later
    late = second.run.remote(gated, {})
    (early_handed, early_began), (late_handed, late_began) = ray.get([early, late])
    assert early_began >= late_handed  # the first trial waited for the second
    assert early_began - early_handed >= 1.5
    assert late_began - late_handed < 1.0  # who completes the wave goes on
    assert waited(first, gated) < 0.1  # the same process's next trial is not held
    assert waited(TrialProcess.remote(), gated) < 1.0  # nor an actor after the wave


def test_a_wave_that_never_fills_opens_at_the_timeout(local_ray):
    gated = gate_first_wave(started_at, size=3, timeout_s=1.5)
    assert 1.5 <= waited(TrialProcess.remote(), gated) < 5.0
    assert waited(TrialProcess.remote(), gated) < 1.0  # open from then on


def test_a_gate_that_is_gone_lets_trials_through(local_ray):
    # As when the gate's node is lost: a retried trial's actor must still run its trial.
    gated = gate_first_wave(started_at, size=2, timeout_s=60)
    gate = inspect.getclosurevars(gated).nonlocals["gate"]
    ray.kill(gate)
    assert waited(TrialProcess.remote(), gated) < 5.0  # not ActorDiedError, nor the timeout
