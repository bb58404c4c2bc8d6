"""What happens to MATE's trainable teachers? Diversity and weights over 20 digits epochs.

    python bench/bench_teachers.py [--weights attention static] [--epochs 20] [--seeds 3]

For each kind of teacher weights (`attention`: the weight network at MATE's defaults;
`static`: trainable vectors with the earlier reconstruction's training, a teacher CE that
reaches the exits, detached targets, exits' CE weighted 1 - lambda, no ramp-up), teacher
support (all | deeper), initialisation (static only: deeper | uniform; `--inits` can add
next) and teacher learning rate, trains MATE on digits (convnet, exits [1, 2, 3, 4], SGD lr
0.05, cosine) and prints, as median [min, max] over the seeds: the teacher diversity (mean
pairwise total-variation distance of the teachers' mean weights over the exits; 0 = one
ensemble in K copies) after epoch 1 and at the end, its lowest value on the way, teacher
1's mean weight on the final exit and how far a sample's weights stray from the mean
(teacher 1's spread, 0 for static weights) at the end, the spread of the teachers'
validation accuracies and the final exit's accuracy at the end.
docs/losses.md's account of teacher collapse comes from this table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from _common import machine, versions

from trainer import metrics as M
from trainer.config import parse_job_config
from trainer.engine import build_job, fit

# The earlier reconstruction's training of static teacher vectors.
STATIC = {
    "teacher_weights": "static",
    "teacher_ce": "exits",
    "detach_targets": True,
    "exit_ce_weight": "one_minus_kd",
    "kd_weight": 0.5,
    "kd_rampup": 0.0,
}


def run(
    weights: str, support: str, init: str, teacher_lr: float, epochs: int, seed: int
) -> dict[str, float]:
    loss = {"kind": "mate", "teacher_support": support, **(STATIC if weights == "static" else {})}
    if weights == "static":
        loss["teacher_init"] = init
    cfg = parse_job_config(
        {
            "dataset": {"name": "digits", "val_fraction": 0.2},
            "model": {"arch": "convnet", "exits": [1, 2, 3, 4]},
            "loss": loss,
            "optim": {"lr": 0.05, "teacher_lr": teacher_lr},
            "train": {"epochs": epochs, "batch_size": 64, "seed": seed},
        }
    )
    history: list[dict[str, float]] = []
    final = fit(build_job(cfg), on_epoch=history.append)
    diversity = [m[M.TEACHER_DIVERSITY] for m in history]
    accs = [final[M.teacher_acc(j)] for j in range(1, 5)]
    return {
        "div@1": diversity[0],
        "div@end": diversity[-1],
        "div min": min(diversity),
        "t1 on exit 4": final[M.teacher_weight(1, 4)],
        "t1 spread": final[M.teacher_spread(1)],
        "acc spread": max(accs) - min(accs),
        "exit 4 acc": final[M.exit_acc(4)],
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weights", nargs="+", default=["attention", "static"])
    parser.add_argument("--teacher-lrs", type=float, nargs="+", default=[0.05, 1.0])
    parser.add_argument("--supports", nargs="+", default=["all", "deeper"])
    parser.add_argument("--inits", nargs="+", default=["deeper", "uniform"])
    args = parser.parse_args()
    print(versions("torch"))
    print(machine())
    print(f"digits, {args.epochs} epochs, seeds 0..{args.seeds - 1}: median [min, max]")
    columns = [
        "div@1",
        "div@end",
        "div min",
        "t1 on exit 4",
        "t1 spread",
        "acc spread",
        "exit 4 acc",
    ]
    header = f"{'weights':<10}{'support':<8}{'init':<9}{'t_lr':>6}  "
    print(header + "".join(f"{c:>24}" for c in columns))
    for weights, support, teacher_lr in itertools.product(
        args.weights, args.supports, args.teacher_lrs
    ):
        for init in args.inits if weights == "static" else ["-"]:
            rows = [
                run(weights, support, init, teacher_lr, args.epochs, seed)
                for seed in range(args.seeds)
            ]
            cells = "".join(f"{summary([r[c] for r in rows]):>24}" for c in columns)
            print(f"{weights:<10}{support:<8}{init:<9}{teacher_lr:>6g}  {cells}", flush=True)


if __name__ == "__main__":
    main()
