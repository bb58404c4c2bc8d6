"""Serving on CIFAR-10 JPEG: the early-exit MLflow model against always running the full network.

Trains a multi-exit resnet20 with the project's engine (`--kind`, DSN by default: the fastest
learner in this short budget, see README "Methods at their defaults"; SGD, cosine schedule, on
a class-stratified share of the 50,000 training images, on `--device`: the CPU by default), or
reuses the checkpoint an earlier run with the same settings cached under the user's cache
directory. Logs it with :func:`trainer.serving.log_servable_model` to a throwaway sqlite store
and loads it back as MLflow loads it for serving (``mlflow.pyfunc.load_model``, on the same
device). Then, per confidence threshold: accuracy and mean GFLOPs per image on the whole test
split (uint8, as a client sends them), and throughput at batch 1 and batch 128 of the served
model on `--images` test images drawn at random (seeded; the split is stored class by class,
so its first images are all airplanes); beside it the full network: normalisation, stem, every
block and the last exit's head only (the raw network the served model holds), which is what a
single-exit deployment runs. Both run in the served model's memory format (channels_last) and
precision (bf16 autocast for a network trained with `--precision bf16`, else float32); a row
"full NCHW" runs the full network in training's memory format, to show what channels_last buys
on the CPU. A last line counts the test images the served model sends out otherwise (exit or
class) than the trainer's own anytime evaluation, which runs the network in training's memory
format.

Last, what stands between FLOPs and time: each stage's share of the FLOPs and of the time at
batch 128; from the trainer's confidences and those stage costs, the least time within 0.5
points that one threshold, or a threshold per exit chosen with hindsight on the test images,
could reach (whether the rule or the network stands in the way); and, at the fastest threshold
within 0.5 points of the full network, the time the early exit spends in each stage against
the full network's (forward hooks on the stages while `early_exit` runs), per image it ran on,
the rest being its decisions and gathers, then the same two by kind of operator (convolutions,
batch norms, ReLUs, residual adds, gathers: torch.profiler's self CPU time over one pass each;
on the CPU only), and what serving adds to each side's network: turning uint8 images into
normalised tensors and answers into a DataFrame, and MLflow's pyfunc layer. `--exits` and
`--head-width` set `model.exits` and `model.head_width` of the network trained.

Accuracy and GFLOPs come from an untimed pass, which also warms up. Throughput is the median
over `--rounds` passes that visit every row in turn, so a change in the machine's load hits
all rows alike; batch 1 runs over the first `--batch1-images` images of each pass. `--threads`
sets torch's threads for the measurement (training uses torch's default). With `--device
cuda` every timing waits for the GPU's queued work before it reads the clock, and images go
to the GPU in each call, as a client's do.

    .venv/bin/python bench/bench_serve.py           # 10% subset, 6 epochs (~25 min on 2 busy cores)
    .venv/bin/python bench/bench_serve.py --quick   # 2% subset, 1 epoch: a smoke run
    .venv/bin/python bench/bench_serve.py --device cuda --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from _common import machine, synchronize, versions
from mlflow.pyfunc import PyFuncModel
from torch.utils.flop_counter import FlopCounterMode

from trainer import metrics as M
from trainer.config import parse_job_config
from trainer.engine import (
    CHECKPOINT_FILE,
    build_job,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
)
from trainer.images import user_cache_dir
from trainer.models import MultiExitNet
from trainer.models.early_exit import early_exit
from trainer.pixels import normalise, pixel_affine
from trainer.precision import autocast_dtype
from trainer.serving import METADATA_KEY, EarlyExitModel, ServingSpec, log_servable_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg  # the tests' data helper

THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]
RULE_GRID = torch.arange(0.3, 1.0, 0.025)  # thresholds the rules choose from
# Kinds of operator by a fragment of their aten name, first match wins; the rest is "other".
OPERATOR_KINDS = {
    "convolutions": ("convolution", "conv2d"),
    "batch norms": ("batch_norm",),
    "ReLUs": ("relu", "clamp_min"),
    "linear layers": ("addmm", "aten::mm"),  # before the adds: aten::addmm
    "residual adds": ("aten::add",),
    "gathers, index writes": ("index", "nonzero", "masked"),
}


def job_dict(root: Path, args) -> dict:
    return {
        "dataset": {
            "name": "imagefolder",
            "root": str(root),
            "image_size": 32,
            "val_fraction": 0.02,  # 1,000 images: a cheap evaluation after each epoch
            "train_fraction": args.train_fraction,
        },
        "model": {"arch": "resnet20", "exits": args.exits, "head_width": args.head_width},
        "loss": {"kind": args.kind},
        "optim": {"name": "sgd", "lr": 0.1, "schedule": "cosine", "weight_decay": 5.0e-4},
        "train": {
            "epochs": args.epochs,
            "batch_size": 128,
            "device": args.device,
            "seed": args.seed,
            "precision": args.precision,
        },
    }


def trained_job(config: dict):
    """The job, trained, or restored from the cached checkpoint of the same config."""
    job = build_job(parse_job_config(config))
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cache = user_cache_dir() / "bench" / f"serve-resnet20-{key}"
    if (cache / CHECKPOINT_FILE).is_file():
        load_checkpoint(job, cache)
        print(f"reused the checkpoint in {cache} (epoch {job.epoch})")
        return job
    start = time.perf_counter()
    last = M.exit_acc(job.cfg.num_exits)
    fit(job, on_epoch=lambda m: print(f"  epoch {m[M.EPOCH]:.0f}: last exit {m[last]:.4f}"))
    print(f"trained in {time.perf_counter() - start:.0f} s; checkpoint cached in {cache}")
    save_checkpoint(job, cache)
    return job


class FullNetwork:
    """Always the whole network: normalise, stem, every block, the last exit's head; in the
    served model's memory format and precision, on its raw network."""

    def __init__(
        self,
        served: PyFuncModel,
        shape: tuple[int, ...],
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        self.network: MultiExitNet = served.get_raw_model()  # eval, channels_last
        if memory_format != torch.channels_last:
            self.network = copy.deepcopy(self.network).to(memory_format=memory_format)
        self.memory_format = memory_format
        self.device = next(self.network.parameters()).device  # the served model's
        self.spec = ServingSpec.from_dict(served.metadata.metadata[METADATA_KEY])
        self.scale, self.shift = pixel_affine(self.spec.mean, self.spec.std, self.device)
        self.dtype = autocast_dtype(self.spec.precision, self.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), self.autocast():
            self.forward(self.inputs(np.zeros((1, *shape), dtype=np.uint8)))
        self.gflops = counter.get_total_flops() / 1e9

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.device).contiguous(memory_format=self.memory_format)
        return normalise(x, self.scale, self.shift)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.network.backbone.stem(x)
        for block in self.network.backbone.blocks:
            h = block(h)
        return self.network.heads[-1](h)[0]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> pd.DataFrame:
        with self.autocast():
            classes = self.forward(self.inputs(images)).argmax(dim=-1).cpu().numpy()
        exit_ = self.network.num_exits
        return pd.DataFrame({"class": classes, "exit": exit_, "gflops": self.gflops})


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


def device_text(device: str) -> str:
    """``no GPU used``, or the GPU's name."""
    return "no GPU used" if device == "cpu" else f"GPU: {torch.cuda.get_device_name(device)}"


def batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def images_per_second(predict: Callable, chunks: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for chunk in chunks:
        predict(chunk)
    return sum(len(c) for c in chunks) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="dsn", help="loss.kind to train with")
    parser.add_argument("--train-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--exits", type=int, nargs="+", default=[3, 5, 7, 9], help="model.exits")
    parser.add_argument("--head-width", type=float, default=1.0, help="model.head_width")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--images", type=int, default=2048, help="test images timed")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per row")
    parser.add_argument("--batch1-images", type=int, default=64, help="per pass at batch 1")
    parser.add_argument("--threads", type=int, help="torch threads [default: torch's]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train and serve")
    parser.add_argument("--quick", action="store_true", help="2%% subset, 1 epoch, 2 thresholds")
    args = parser.parse_args()
    if args.quick:
        args.train_fraction, args.epochs, args.thresholds = 0.02, 1, [0.5, 0.9]
        args.images, args.rounds, args.batch1_images = 256, 1, 16
    print(versions("torch", "mlflow"))
    print(machine() + f", torch threads {torch.get_num_threads()}, {device_text(args.device)}")
    start = time.perf_counter()
    job = trained_job(job_dict(cifar10_jpeg(), args))
    if args.threads:
        torch.set_num_threads(args.threads)
    images = job.data.test.images.cpu().numpy()  # uint8 [N, 3, 32, 32], as a client has them
    labels = job.data.test.labels.cpu().numpy()
    timed = images[np.random.default_rng(args.seed).permutation(len(images))[: args.images]]

    with tempfile.TemporaryDirectory() as work:
        mlflow.set_tracking_uri(f"sqlite:///{Path(work) / 'mlflow.db'}")
        artifacts = (Path(work) / "artifacts").as_uri()
        experiment = mlflow.create_experiment("bench-serve", artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment):
            info = log_servable_model(job.model, job.cfg, job.data)
        served = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": args.device})
    full = FullNetwork(served, images.shape[1:])
    training_layout = FullNetwork(served, images.shape[1:], torch.contiguous_format)
    predictors: dict[str, Callable] = {"full": full.predict, "full NCHW": training_layout.predict}
    for t in args.thresholds:
        predictors[f"{t:g}"] = functools.partial(served.predict, params={"threshold": t})

    every = batches(images, 128)
    answers = {name: pd.concat([p(c) for c in every]) for name, p in predictors.items()}  # warm
    b128, b1 = batches(timed, 128), batches(timed[: args.batch1_images], 1)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
    for r in range(args.rounds):  # interleaved, so every row sees the same machine load
        for name, p in predictors.items():
            rates[name].append((images_per_second(p, b1), images_per_second(p, b128)))
        print(f"  timing round {r + 1}/{args.rounds} done; {machine()}")
    best = report(answers, rates, labels, job.cfg.num_exits, args)
    logits = predict(job, job.data.test).logits.cpu()
    confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
    agreement(answers, confidence, predicted)
    exit_costs = stage_costs(full, timed[:128])
    threshold_rules(confidence, predicted == torch.from_numpy(labels), torch.tensor(exit_costs))
    if best is not None:
        early_exit_costs(full, timed, float(best))
        own_work(served, full, timed, float(best), batch=128)
        own_work(served, full, timed[: args.batch1_images], float(best), batch=1)
    print(f"wall clock {time.perf_counter() - start:.0f} s; {machine()}")


def agreement(
    answers: dict[str, pd.DataFrame], confidence: torch.Tensor, predicted: torch.Tensor
) -> None:
    """How many test images the served model sends out at another exit, or with another
    class, than the trainer's anytime evaluation (`confidence`, `predicted`: [K, N], its
    network in training's layout)."""
    differ = []
    for name, frame in answers.items():
        if name.startswith("full"):
            continue
        exits = M.exit_at_threshold(confidence, torch.tensor([float(name)]))[0]
        classes = predicted.gather(0, exits[None])[0].numpy()
        same = (frame["exit"].to_numpy() == exits.numpy() + 1) & (frame["class"] == classes)
        differ.append(f"{name}: {int((~same).sum())}")
    print(f"images served otherwise than the trainer's anytime evaluation: {', '.join(differ)}")


def threshold_rules(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    exit_costs: torch.Tensor,
    grid: torch.Tensor = RULE_GRID,
) -> None:
    """Whether the rule or the network stands in the way: the least time within 0.5 points
    of the full network on the test images (`confidence`, `correct`: [K, N], the trainer's),
    predicted as the shares leaving at each exit times `exit_costs` (the time of leaving at
    each exit against the full network), for one threshold at every exit and for a threshold
    per exit chosen with hindsight on these images, each from `grid`. Up to the grid's step,
    the second bounds every rule that ranks an exit's images by its max softmax, calibrated
    per exit (temperature scaling) or not."""
    share, accuracy = _leaving_shares(confidence, correct, grid)  # [G, .., G, K], [G, .., G]
    too_low = accuracy < correct[-1].float().mean() - 0.005
    cost = (share @ exit_costs).masked_fill(too_low, float("inf"))
    same = (torch.arange(len(grid)),) * cost.dim()  # the diagonal: one threshold everywhere
    rules = {
        "one threshold": (same[0][cost[same].argmin()],) * cost.dim(),
        "a threshold per exit": torch.unravel_index(cost.argmin(), cost.shape),
    }
    print(
        "\nthreshold rules, with hindsight on the test images: the least time within 0.5 points"
        " of the full network,\npredicted as the shares leaving at each exit times the costs"
        " of leaving there (above)"
    )
    for rule, best in rules.items():
        if cost[best].isinf():
            print(f"  {rule:>20}: none within 0.5 points")
            continue
        print(
            f"  {rule:>20}: {', '.join(f'{grid[i]:.3g}' for i in best)} -> {cost[best]:.3f} of"
            f" the full network's time ({1 / cost[best]:.2f}x), shares leaving at each exit "
            + " ".join(f"{x:.2f}" for x in share[best].tolist())
        )


def _leaving_shares(
    confidence: torch.Tensor, correct: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every choice of a threshold from `grid` at each of exits 1..K-1 (the last exit
    takes everyone left): the share of the images leaving at each exit, [G, .., G, K], and
    the accuracy, [G, .., G]."""
    exits, images = confidence.shape
    alive = torch.ones(images, dtype=torch.bool)
    leaving, hits = [], torch.zeros(())
    for k in range(exits):
        if k < exits - 1:  # a new axis for this exit's threshold
            shape = [1] * (exits - 1) + [images]
            shape[k] = len(grid)
            leave = alive & (confidence[k] >= grid.view(-1, 1)).view(shape)
            alive = alive & ~leave
        else:
            leave = alive
        leaving.append(leave.sum(dim=-1))
        hits = hits + (leave & correct[k]).sum(dim=-1)
    share = torch.stack(torch.broadcast_tensors(*leaving), dim=-1) / images
    return share, hits / images


def report(answers: dict, rates: dict, labels: np.ndarray, exits: int, args) -> str | None:
    """One row per predictor: accuracy, GFLOPs, median images/s at batch 1 and 128; returns
    the fastest threshold within 0.5 points of the full network's accuracy, if any."""
    placement = ",".join(map(str, args.exits))
    print(
        f"\nresnet20 (exits {placement}, head width {args.head_width}), {args.kind}, "
        f"{args.epochs} epochs on {args.train_fraction:.0%} of the training set (seed "
        f"{args.seed}); accuracy on the {len(labels)} test images, images/s on "
        f"{args.images} of them (median of {args.rounds} interleaved passes), "
        f"{args.precision}, {device_text(args.device)}, torch threads {torch.get_num_threads()}"
    )
    head = ["threshold", "accuracy", "Δ acc pts", "GFLOPs/img", "img/s b1", "img/s b128"]
    columns = "".join(f"{h:>11}" for h in [*head, "x full b128"])
    print(f"{columns}  share leaving at exit 1..{exits}")
    rows = {}
    for name, frame in answers.items():
        acc = float((frame["class"].to_numpy() == labels).mean())
        b1, b128 = (statistics.median(r[i] for r in rates[name]) for i in (0, 1))
        share = frame["exit"].value_counts(normalize=True)
        rows[name] = (acc, float(frame["gflops"].mean()), b1, b128)
        shares = " ".join(f"{share.get(k, 0.0):.2f}" for k in range(1, exits + 1))
        full_acc, _, _, full_b128 = rows["full"]
        cells = [name, f"{acc:.4f}", f"{100 * (acc - full_acc):+.2f}", f"{rows[name][1]:.4f}"]
        cells += [f"{b1:.1f}", f"{b128:.1f}", f"{b128 / full_b128:.2f}"]
        print("".join(f"{c:>11}" for c in cells) + f"  {shares}")
    thresholds = {n: r for n, r in rows.items() if not n.startswith("full")}
    within = {n: r for n, r in thresholds.items() if r[0] >= full_acc - 0.005}
    if not within:
        print("no threshold is within 0.5 points of the full network's accuracy: goal missed")
        return None
    name, best = max(within.items(), key=lambda item: item[1][3])
    ratio = best[3] / full_b128
    print(
        f"fastest threshold within 0.5 points of the full network: {name}, {ratio:.2f}x its "
        f"throughput at batch 128 (goal 1.5x: {'met' if ratio >= 1.5 else 'missed'})"
    )
    return name


if __name__ == "__main__":
    main()
