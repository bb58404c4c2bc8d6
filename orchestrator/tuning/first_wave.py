"""The sweep's first trials start together, so that Tune keeps one actor per slot.

Tune reuses the actor of a trial that ends for the next trial waiting (``reuse_actors``), and
removes the actor it had already asked for that trial. When trials end before the actors of
the first wave are up (short trials, slow actor starts: a new actor imports Ray Tune and the
trainer), the waiting trials keep taking the actors of those that ended, the actors being
started are removed as fast as they are asked for, and the sweep settles at a few actors
instead of one per slot, its CPU spent on processes that never run a trial (measured:
docs/benchmarks.md). So each trial actor, before its first trial, waits until the first wave
has arrived (as many actors as trials may run at once) or `timeout_s` has passed; after that
the gate stays open, and a later actor (a retried trial's) goes straight through.

The gate lives on the driver's node, so it lasts as long as the sweep. A trial actor that
cannot reach it goes through as if it were open: the gate only spaces out the first wave and
must never fail a trial (retried trials did fail when the gate had been on the node they
were lost with).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["FIRST_WAVE_TIMEOUT_S", "gate_first_wave"]

FIRST_WAVE_TIMEOUT_S = 30.0  # at most this long a first trial waits for the others' actors
_passed = False  # set in a trial actor's process once it went through the gate


@ray.remote(num_cpus=0)
class _FirstWaveGate:
    """Opens when `size` actors arrived, or when one has waited `timeout_s`."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s, self.arrived = size, timeout_s, 0
        self.opened = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.size:
            self.opened.set()
        try:
            await asyncio.wait_for(self.opened.wait(), self.timeout_s)
        except TimeoutError:
            self.opened.set()  # the wave is the actors that started in time


def gate_first_wave(
    trainable: Callable[[dict[str, Any]], None],
    size: int,
    timeout_s: float = FIRST_WAVE_TIMEOUT_S,
) -> Callable[[dict[str, Any]], None]:
    """`trainable`, whose actors' first trial waits for the first `size` actors to be up.
    Needs a connected Ray (the gate is an actor of no resources, owned by this driver and on
    its node)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gate = _FirstWaveGate.options(scheduling_strategy=here).remote(size, timeout_s)

    @functools.wraps(trainable)
    def gated(config: dict[str, Any]) -> None:
        _pass_once(gate)
        return trainable(config)

    return gated


def _pass_once(gate: ray.actor.ActorHandle) -> None:
    """In a trial actor: wait at the gate before this process's first trial only; a gate
    that is gone counts as open."""
    global _passed
    if not _passed:
        with contextlib.suppress(RayActorError):
            ray.get(gate.arrive.remote())
        _passed = True
