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
`--head-width` set `model.exits` and `model.head_width` of the network trained; `--set
KEY=VALUE` any other setting of its job (`--set loss.temperature=2.3`: a sweep's choice).

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
import functools
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from _common import machine, versions
from _full_network import FullNetwork, batches
from _serving_costs import early_exit_costs, own_work, stage_costs
from _threshold_rules import threshold_rules

from trainer import metrics as M
from trainer.config import JobConfig, apply_overrides, parse_job_config
from trainer.engine import (
    CHECKPOINT_FILE,
    build_job,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
)
from trainer.images import user_cache_dir
from trainer.serving import log_servable_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg  # the tests' data helper

# Finer where accuracy comes within 0.5 points of the full network's (0.875 since run 12,
# whose fastest threshold there lay between 0.85 and 0.9).
THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.95]


def job_config(root: Path, args) -> JobConfig:
    """The job the benchmark trains, with the `--set` overrides on top."""
    config = {
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
    return apply_overrides(parse_job_config(config), dict(args.set), source="--set")


def setting(text: str) -> tuple[str, Any]:
    """One `--set KEY=VALUE`: a dotted key of the job config and its value, read as YAML."""
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def trained_job(cfg: JobConfig):
    """The job, trained, or restored from the cached checkpoint of the same config."""
    job = build_job(cfg)
    config = json.dumps(cfg.explicit_dict(), sort_keys=True)
    key = hashlib.sha256(config.encode()).hexdigest()[:16]
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


def device_text(device: str) -> str:
    """``no GPU used``, or the GPU's name."""
    return "no GPU used" if device == "cpu" else f"GPU: {torch.cuda.get_device_name(device)}"


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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=setting,
        metavar="KEY=VALUE",
        help="any other job setting, e.g. loss.temperature=2.3 (repeatable)",
    )
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
    job = trained_job(job_config(cifar10_jpeg(), args))
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


def report(answers: dict, rates: dict, labels: np.ndarray, exits: int, args) -> str | None:
    """One row per predictor: accuracy, GFLOPs, median images/s at batch 1 and 128; returns
    the fastest threshold within 0.5 points of the full network's accuracy, if any."""
    placement = ",".join(map(str, args.exits))
    print(
        f"\nresnet20 (exits {placement}, head width {args.head_width}), {args.kind}"
        f"{''.join(f', {key}={value}' for key, value in args.set)}, "
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
