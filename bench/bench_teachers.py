"""What happens to MATE's trainable teachers? Diversity and weights over 20 digits epochs.

    python bench/bench_teachers.py [--epochs 20] [--seeds 3] [--teacher-lrs 0.05 1.0]

For each teacher support (all | deeper), initialisation (deeper | uniform; `--inits` can
add next) and teacher learning rate, trains MATE on digits (convnet, exits [1, 2, 3, 4],
SGD lr 0.05, cosine) and prints, as median [min, max] over the seeds: the teacher
diversity (mean pairwise total-variation distance of the teachers' weights over the exits;
0 = one ensemble in K copies) after epoch 1 and at the end, its lowest value on the way,
teacher 1's weight on the final exit at the end, the spread of the teachers' validation
accuracies and the final exit's accuracy at the end.
The README's account of teacher collapse comes from this table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from _common import machine, versions

from trainer import metrics as M
from trainer.config import parse_job_config
from trainer.engine import build_job, fit


def run(support: str, init: str, teacher_lr: float, epochs: int, seed: int) -> dict[str, float]:
    cfg = parse_job_config(
        {
            "dataset": {"name": "digits", "val_fraction": 0.2},
            "model": {"arch": "convnet", "exits": [1, 2, 3, 4]},
            "loss": {"kind": "mate", "teacher_support": support, "teacher_init": init},
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
        "acc spread": max(accs) - min(accs),
        "exit 4 acc": final[M.exit_acc(4)],
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-lrs", type=float, nargs="+", default=[0.05, 1.0])
    parser.add_argument("--supports", nargs="+", default=["all", "deeper"])
    parser.add_argument("--inits", nargs="+", default=["deeper", "uniform"])
    args = parser.parse_args()
    print(versions("torch"))
    print(machine())
    print(f"digits, {args.epochs} epochs, seeds 0..{args.seeds - 1}: median [min, max]")
    columns = ["div@1", "div@end", "div min", "t1 on exit 4", "acc spread", "exit 4 acc"]
    print(f"{'support':<8}{'init':<9}{'t_lr':>6}  " + "".join(f"{c:>24}" for c in columns))
    for support, init, teacher_lr in itertools.product(args.supports, args.inits, args.teacher_lrs):
        rows = [run(support, init, teacher_lr, args.epochs, s) for s in range(args.seeds)]
        cells = "".join(f"{summary([r[c] for r in rows]):>24}" for c in columns)
        print(f"{support:<8}{init:<9}{teacher_lr:>6g}  {cells}", flush=True)


if __name__ == "__main__":
    main()
