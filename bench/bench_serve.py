"""Serving on CIFAR-10 JPEG: the early-exit MLflow model against always running the full network.

Trains a multi-exit resnet20 with the project's engine (MATE at its defaults, SGD, cosine
schedule, on a class-stratified share of the 50,000 training images, CPU), or reuses the
checkpoint an earlier run with the same settings cached under the user's cache directory.
Logs it with :func:`trainer.serving.log_servable_model` to a throwaway sqlite store and loads
it back as MLflow loads it for serving (``mlflow.pyfunc.load_model``, CPU). Then, on the
10,000 test images (uint8, as a client sends them), per confidence threshold: accuracy, mean
GFLOPs per image, and throughput at batch 1 and batch 128 of the served model; beside it the
full network: normalisation, stem, every block and the last exit's head only (the raw network
from ``mlflow.pytorch.load_model``), which is what a single-exit deployment would run.

Batch 128 runs over all test images (the faster of `--repeats` passes); batch 1 over the first
`--batch1-images`. Accuracy and GFLOPs come from the first batch-128 pass.

    .venv/bin/python bench/bench_serve.py           # 10% subset, 6 epochs (~30 min on 2 busy cores)
    .venv/bin/python bench/bench_serve.py --quick   # 2% subset, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
from _common import machine, versions
from torch.utils.flop_counter import FlopCounterMode

from trainer import metrics as M
from trainer.config import parse_job_config
from trainer.engine import CHECKPOINT_FILE, build_job, fit, load_checkpoint, save_checkpoint
from trainer.images import user_cache_dir
from trainer.models import MultiExitNet
from trainer.pixels import normalise, pixel_affine
from trainer.serving import log_servable_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cifar10_jpeg import cifar10_jpeg  # the tests' data helper

THRESHOLDS = [0.6, 0.8, 0.9, 0.95, 0.99]


def job_dict(root: Path, args) -> dict:
    return {
        "dataset": {
            "name": "imagefolder",
            "root": str(root),
            "image_size": 32,
            "val_fraction": 0.02,  # 1,000 images: a cheap evaluation after each epoch
            "train_fraction": args.train_fraction,
        },
        "model": {"arch": "resnet20", "exits": [3, 5, 7, 9]},
        "optim": {"name": "sgd", "lr": 0.1, "schedule": "cosine", "weight_decay": 5.0e-4},
        "train": {"epochs": args.epochs, "batch_size": 128, "device": "cpu", "seed": args.seed},
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
    """Always the whole network: normalise, stem, every block, the last exit's head."""

    def __init__(self, network: MultiExitNet, mean, std) -> None:
        self.network = network.eval()
        self.scale, self.shift = pixel_affine(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.network.backbone.stem(x)
        for block in self.network.backbone.blocks:
            h = block(h)
        return self.network.heads[-1](h)[0]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        x = normalise(torch.from_numpy(images), self.scale, self.shift)
        return self.forward(x).argmax(dim=-1).numpy()

    def gflops(self, shape: tuple[int, ...]) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.forward(torch.zeros(1, *shape))
        return counter.get_total_flops() / 1e9


def batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def timed_pass(predict, chunks: list[np.ndarray], repeats: int) -> tuple[float, list]:
    """(images per second, the first pass's outputs): the fastest of `repeats` passes."""
    predict(chunks[0])  # warm-up
    best, first = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [predict(chunk) for chunk in chunks]
        best = min(best, time.perf_counter() - start)
        first = first or outputs
    return sum(len(c) for c in chunks) / best, first


def batch1_rate(predict, images: np.ndarray) -> float:
    """Images per second, one image per call: 1 / the median call time (after 3 warm-ups)."""
    for image in images[:3]:
        predict(image[None])
    times = []
    for image in images:
        start = time.perf_counter()
        predict(image[None])
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--repeats", type=int, default=1, help="batch-128 passes per row")
    parser.add_argument("--batch1-images", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="2%% subset, 1 epoch, 2 thresholds")
    args = parser.parse_args()
    if args.quick:
        args.train_fraction, args.epochs, args.thresholds = 0.02, 1, [0.5, 0.9]
        args.repeats, args.batch1_images = 1, 50
    print(versions("torch", "mlflow"))
    print(machine() + f", torch threads {torch.get_num_threads()}, no GPU used")
    start = time.perf_counter()
    job = trained_job(job_dict(cifar10_jpeg(), args))
    images = job.data.test.images.numpy()  # uint8 [10000, 3, 32, 32]
    labels = job.data.test.labels.numpy()

    with tempfile.TemporaryDirectory() as work:
        mlflow.set_tracking_uri(f"sqlite:///{Path(work) / 'mlflow.db'}")
        artifacts = (Path(work) / "artifacts").as_uri()
        experiment = mlflow.create_experiment("bench-serve", artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment):
            info = log_servable_model(job.model, job.cfg, job.data)
        served = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
        full = FullNetwork(mlflow.pytorch.load_model(info.model_uri), job.data.mean, job.data.std)

    rows = []
    rate, outputs = timed_pass(full.predict, batches(images, 128), args.repeats)
    acc = float((np.concatenate(outputs) == labels).mean())
    b1 = batch1_rate(full.predict, images[: args.batch1_images])
    rows.append(("full", acc, full.gflops(images.shape[1:]), b1, rate, ""))
    for threshold in args.thresholds:
        params = {"threshold": threshold}

        def predict(chunk, params=params):
            return served.predict(chunk, params=params)

        rate, outputs = timed_pass(predict, batches(images, 128), args.repeats)
        answers = pd.concat(outputs)
        share = answers["exit"].value_counts(normalize=True).sort_index()
        exits = " ".join(f"{share.get(k, 0.0):.2f}" for k in range(1, job.cfg.num_exits + 1))
        acc = float((answers["class"].to_numpy() == labels).mean())
        b1 = batch1_rate(predict, images[: args.batch1_images])
        rows.append((f"{threshold:g}", acc, float(answers["gflops"].mean()), b1, rate, exits))

    full_acc, full_rate = rows[0][1], rows[0][4]
    print(
        f"\nresnet20 (exits 3,5,7,9), MATE, {args.epochs} epochs on {args.train_fraction:.0%} of "
        f"the training set (seed {args.seed}); {len(images)} test images, CPU"
    )
    head = ["threshold", "accuracy", "Δ acc", "GFLOPs/img", "img/s b1", "img/s b128", "x full b128"]
    print("".join(f"{h:>12}" for h in head) + "  share leaving at exit 1..4")
    for name, acc, gflops, b1, b128, exits in rows:
        cells = [name, f"{acc:.4f}", f"{100 * (acc - full_acc):+.2f}", f"{gflops:.4f}"]
        cells += [f"{b1:.0f}", f"{b128:.0f}", f"{b128 / full_rate:.2f}"]
        print("".join(f"{c:>12}" for c in cells) + f"  {exits}")
    within = [r for r in rows[1:] if r[1] >= full_acc - 0.005]
    if within:
        best = max(within, key=lambda r: r[4])
        verdict = "met" if best[4] >= 1.5 * full_rate else "missed"
        print(
            f"fastest threshold within 0.5 points of the full network: {best[0]}, "
            f"{best[4] / full_rate:.2f}x its throughput at batch 128 (goal 1.5x: {verdict})"
        )
    else:
        print("no threshold is within 0.5 points of the full network (goal missed)")
    print(f"wall clock {time.perf_counter() - start:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
