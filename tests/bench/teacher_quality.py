"""Benchmark: how good a tiny teacher gets on synthetic data on this machine's CPU, against wall time.

    python tests/bench/teacher_quality.py [--minutes 20] [--train 2000] [--val 300] [--workdir DIR]

Trains the hybrid-tiny-teacher preset, evaluating every epoch, and prints AP and AP50 on the validation split
against wall-clock time. Target (issue 2): AP50 >= 0.5 within 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from clockdistill.config.layers import resolve_config
from clockdistill.data.synth import ensure_synthetic
from clockdistill.engine import fit
from sweeps.demo import TRAIN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for training + evaluation")
    ap.add_argument("--train", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--val", type=int, default=300, help="synthetic validation images")
    ap.add_argument("--epochs", type=int, default=30, help="schedule length (the cosine decays over it)")
    ap.add_argument("--preset", default="hybrid-tiny-teacher")
    ap.add_argument("--workdir", default=None, help="keep data and checkpoints here (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="teacher-bench-"))
    data = ensure_synthetic(work / "data", args.train, args.val, progress=False)
    cfg = resolve_config(
        {
            "name": "teacher-bench",
            "data": {"root": str(data)},
            "model": {"preset": args.preset},
            "train": {
                **TRAIN,
                "epochs": args.epochs,
                "output_dir": str(work / "teacher"),
                "resume": False,
                "progress": False,
            },
        },
        args.overrides,
    )
    print(
        f"# {args.preset} on {args.train}/{args.val} synthetic images, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, budget {args.minutes} min"
    )
    print(f"{'epoch':>5} {'wall_s':>8} {'loss':>8} {'AP':>7} {'AP50':>7}")
    start = time.perf_counter()
    rows = []

    def report(epoch, metrics, _ckpt):
        wall = time.perf_counter() - start
        rows.append((epoch, wall, metrics["AP"], metrics["AP50"]))
        print(
            f"{epoch:>5} {wall:>8.1f} {metrics['loss']:>8.3f} {metrics['AP']:>7.4f} {metrics['AP50']:>7.4f}", flush=True
        )
        return wall > args.minutes * 60

    fit(cfg, on_epoch_end=report)
    best = max(rows, key=lambda r: r[3])
    reached = next((r for r in rows if r[3] >= 0.5), None)
    print(f"best AP50 {best[3]:.4f} (AP {best[2]:.4f}) at epoch {best[0]}, {best[1] / 60:.1f} min")
    print(
        "AP50 >= 0.5 reached at "
        + (f"{reached[1] / 60:.1f} min (epoch {reached[0]})" if reached else "no point within the budget")
    )


if __name__ == "__main__":
    main()
