"""What stands between FLOPs and time in the serving benchmark: each stage's share of the
FLOPs and of the time, the early exit stage by stage against the full network (forward hooks
on the stages while `early_exit` runs), the same by kind of operator (torch.profiler, on the
CPU only), and what serving adds to each side's network (uint8 in, a DataFrame out, MLflow's
pyfunc layer)."""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import synchronize
from _full_network import FullNetwork, batches
from mlflow.pyfunc import PyFuncModel
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import MultiExitNet
from trainer.models.early_exit import early_exit
from trainer.serving import EarlyExitModel

# Kinds of operator by a fragment of their aten name, first match wins; the rest is "other".
OPERATOR_KINDS = {
    "convolutions": ("convolution", "conv2d"),
    "batch norms": ("batch_norm",),
    "ReLUs": ("relu", "clamp_min"),
    "linear layers": ("addmm", "aten::mm"),  # before the adds: aten::addmm
    "residual adds": ("aten::add",),
    "gathers, index writes": ("index", "nonzero", "masked"),
}


@torch.no_grad()
def stage_costs(full: FullNetwork, images: np.ndarray, rounds: int = 7) -> list[float]:
    """Per stage of the network (stem, each block, each exit's head) on the batch `images`:
    its share of the FLOPs and of the time (median of `rounds`), and what reaching each exit
    costs in time against the full network (stem, every block, the last head); returns those
    costs, one per exit."""
    with full.autocast():
        return _stage_costs(full.network, full.inputs(images), rounds)


def named_stages(network: MultiExitNet) -> list[tuple[str, torch.nn.Module]]:
    """The stem, then each block followed by its exit head if it has one, in running order."""
    stages: list[tuple[str, torch.nn.Module]] = [("stem", network.backbone.stem)]
    for index, (block, head) in enumerate(network.stages(), start=1):
        stages.append((f"block {index}", block))
        if head is not None:
            stages.append((f"exit head {index}", head))
    return stages


def _stage_costs(network: MultiExitNet, x: torch.Tensor, rounds: int) -> list[float]:
    parts: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    h = x
    for name, module in named_stages(network):
        parts.append((name, module, h))
        if not name.startswith("exit"):
            h = module(h)
    costs = {}
    for name, module, inputs in parts:
        with FlopCounterMode(display=False) as counter:
            module(inputs)
        times = []
        for _ in range(rounds):
            synchronize(x.device)
            start = time.perf_counter()
            module(inputs)
            synchronize(x.device)
            times.append(time.perf_counter() - start)
        costs[name] = (counter.get_total_flops(), statistics.median(times))
    flops, seconds = (sum(c[i] for c in costs.values()) for i in (0, 1))
    print(f"\nwhere the time goes, batch {len(x)}:  stage  FLOPs share  time share")
    for name, (f, t) in costs.items():
        print(f"  {name:>15} {f / flops:12.1%} {t / seconds:11.1%}")
    heads = [name for name in costs if name.startswith("exit")]
    full = seconds - sum(costs[name][1] for name in heads[:-1])
    spent, exit_costs = 0.0, []
    for name, (_, t) in costs.items():
        spent += t
        if name.startswith("exit"):
            exit_costs.append(spent / full)
            block = name.split()[-1]
            print(f"  leaving after block {block} costs {spent / full:.2f} of the full network")
    return exit_costs


class StageClock:
    """Forward hooks on each stage: the seconds spent in it and the images it ran on."""

    def __init__(self, network: MultiExitNet) -> None:
        stages = named_stages(network)
        self.seconds = {name: 0.0 for name, _ in stages}
        self.images = {name: 0 for name, _ in stages}
        self.started = 0.0
        self.handles = [
            hook
            for name, module in stages
            for hook in (
                module.register_forward_pre_hook(functools.partial(self.start, name)),
                module.register_forward_hook(functools.partial(self.stop, name)),
            )
        ]

    def start(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        self.images[name] += len(args[0])
        synchronize(args[0].device)
        self.started = time.perf_counter()

    def stop(self, name: str, module: torch.nn.Module, args: tuple, output) -> None:
        synchronize(args[0].device)
        self.seconds[name] += time.perf_counter() - self.started

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def operator_kind(name: str) -> str:
    """The OPERATOR_KINDS entry an aten operator's name falls under, else "other"."""
    for kind, fragments in OPERATOR_KINDS.items():
        if any(fragment in name for fragment in fragments):
            return kind
    return "other"


def operator_ms(run: Callable, chunks: list) -> dict[str, float]:
    """Self CPU milliseconds per kind of operator over one profiled pass of `run` on `chunks`."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on a CPU
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        for x in chunks:
            run(x)
    ms = dict.fromkeys([*OPERATOR_KINDS, "other"], 0.0)
    for event in profiled.key_averages():
        ms[operator_kind(event.key)] += event.self_cpu_time_total / 1e3
    return ms


def clocked_pass(network: MultiExitNet, run: Callable, chunks: list) -> tuple[StageClock, float]:
    """Run `run` on every chunk with a StageClock on `network`: (the clock, total seconds)."""
    clock = StageClock(network)
    start = time.perf_counter()
    for x in chunks:
        run(x)
    synchronize(chunks[0].device)
    seconds = time.perf_counter() - start
    clock.remove()
    return clock, seconds


@torch.no_grad()
def early_exit_costs(
    full: FullNetwork, images: np.ndarray, threshold: float, rounds: int = 5
) -> None:
    """Per stage, over `images` in batches of 128: the time the full network and the early
    exit at `threshold` spend in it (median of `rounds` interleaved passes), the share of the
    images it ran on in the early exit, and its time per image there against the full
    network's; the rest of the early exit's time is its decisions and gathers."""
    chunks = [full.inputs(chunk) for chunk in batches(images, 128)]
    runs = {
        "full": full.forward,
        "early": lambda x: early_exit(full.network, x, threshold),
    }
    passes: dict[str, list[tuple[StageClock, float]]] = {name: [] for name in runs}
    with full.autocast():
        for _ in range(rounds):  # interleaved, as in the throughput rounds
            for name, run in runs.items():
                passes[name].append(clocked_pass(full.network, run, chunks))
        by_operator = (  # self CPU time says little of a GPU's work
            {name: operator_ms(run, chunks) for name, run in runs.items()}
            if full.device.type == "cpu"
            else {}
        )
    ran = passes["early"][0][0].images  # the same images every pass
    ms = {
        name: {stage: 1e3 * statistics.median(c.seconds[stage] for c, _ in p) for stage in ran}
        for name, p in passes.items()
    }
    total = {name: 1e3 * statistics.median(t for _, t in p) for name, p in passes.items()}
    print(
        f"\nthe early exit at {threshold:g} against the full network, stage by stage, over "
        f"{len(images)} images in batches of 128 (median of {rounds} passes):"
    )
    print(f"  {'stage':>15} {'full ms':>9} {'early ms':>9} {'images':>7} {'per image':>10}")
    for stage, count in ran.items():
        share, full_ms, early_ms = count / len(images), ms["full"][stage], ms["early"][stage]
        per_image = f"{early_ms / (share * full_ms):9.2f}x" if share and full_ms else ""
        print(f"  {stage:>15} {full_ms:9.1f} {early_ms:9.1f} {share:7.0%} {per_image}")
    outside = {name: total[name] - sum(ms[name].values()) for name in runs}
    print(
        f"  {'outside stages':>15} {outside['full']:9.1f} {outside['early']:9.1f}"
        "   (decisions, gathers)"
    )
    print(
        f"  {'total':>15} {total['full']:9.1f} {total['early']:9.1f}   "
        f"{total['full'] / total['early']:.2f}x the full network's throughput"
    )
    if not by_operator:
        return
    print("  by kind of operator (self CPU time, one profiled pass each; the full network's share)")
    whole = sum(by_operator["full"].values())
    for kind, full_ms in by_operator["full"].items():
        early_ms = by_operator["early"][kind]
        print(f"  {kind:>22} {full_ms:9.1f} {early_ms:9.1f} {full_ms / whole:7.0%}")


@torch.no_grad()
def own_work(
    served: PyFuncModel,
    full: FullNetwork,
    images: np.ndarray,
    threshold: float,
    batch: int,
    rounds: int = 5,
) -> None:
    """What serving adds to the network, per call on `batch` images of `images` (median of
    `rounds` passes, each running every row on one batch before the next): each side's network
    alone on normalised tensors, then with the uint8 input turned into them and the answers
    into a DataFrame (the full network's predict, the served model's own predict), then the
    early exit through ``mlflow.pyfunc`` (its input and parameter checks); each row against
    the full network alone."""
    chunks = batches(images, batch)
    tensors = [full.inputs(chunk) for chunk in chunks]
    wrapper = EarlyExitModel(full.network, full.spec, full.device)  # the served model's own
    params = {"threshold": threshold}
    rows: dict[str, tuple[Callable, list]] = {
        "full network alone": (full.forward, tensors),
        "full, uint8 in, DataFrame out": (full.predict, chunks),
        "early exit alone": (lambda x: early_exit(full.network, x, threshold), tensors),
        "early exit, uint8 in, DataFrame out": (
            functools.partial(wrapper.predict, params=params),
            chunks,
        ),
        "early exit through mlflow.pyfunc": (
            functools.partial(served.predict, params=params),
            chunks,
        ),
    }
    seconds = {name: [0.0] * rounds for name in rows}
    with full.autocast():
        for r in range(rounds):
            for i in range(len(chunks)):  # every row on each batch in turn: the least drift
                for name, (run, inputs) in rows.items():
                    start = time.perf_counter()
                    run(inputs[i])
                    synchronize(full.device)
                    seconds[name][r] += time.perf_counter() - start
    ms = {name: 1e3 * statistics.median(s) / len(chunks) for name, s in seconds.items()}
    print(
        f"\nwhat serving adds at {threshold:g}, per call on {batch} image(s), over {len(images)}"
        f" images (median of {rounds} passes, interleaved call by call):"
        f"\n  {'':>36} {'ms/call':>9} {'added':>7}  x the full network alone"
    )
    before = ""
    for name, value in ms.items():
        added = "" if name.endswith("alone") else f"{value - ms[before]:+7.2f}"
        print(f"  {name:>36} {value:9.2f} {added:>7}  {ms['full network alone'] / value:.2f}x")
        before = name
