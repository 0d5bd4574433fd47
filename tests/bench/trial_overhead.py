"""Benchmark: how much of a trial's wall time is not training or evaluation, in the demo sweep.

    python tests/bench/trial_overhead.py [--workdir demo-run] [--variants baseline,optimised]

Runs the demo sweep (sweeps/configs/demo.yaml: 8 trials, 4 epochs, TPE + ASHA, 2 at a time) once per
variant, each in its own local Ray and MLflow store under <workdir>/bench/, with a fresh node cache,
so the first trial pays for building the caches as on a new node:

    overhead-baseline    a new process per trial, images decoded from their files, live teacher
    overhead-optimised   reused trial processes, decoded-image cache, teacher-output cache (the demo spec)

Each trial reports its own clock (sweeps/tune/trial.py): trial_wall_s from its process start (or its
reused process's previous trial end) to its last report, of which trial_overhead_s was not spent in
training or evaluation epochs; startup_s is that part before its first report. Printed: per-variant
sums, the overhead fraction (target < 5%), median start-up, mean epoch time and the sweep's wall
time, and the ratios between the variants. The demo teacher is trained first when missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo_sweeps import run_variant  # noqa: E402

VARIANTS = {
    "overhead-baseline": {
        "reuse_actors": False,
        "config": {"data": {"decoded_cache": False}, "distill": {"teacher_cache": "off"}},
    },
    "overhead-optimised": {
        "reuse_actors": True,
        "config": {"data": {"decoded_cache": True}, "distill": {"teacher_cache": "on"}},
    },
}


def measure(name: str, workdir: Path) -> dict:
    run = run_variant(name, workdir, VARIANTS[name])
    trials = run["trials"]
    busy = sum(r.get("train_time_s", 0) + r.get("eval_time_s", 0) for rows in trials.values() for r in rows)
    trial_wall = sum(rows[-1]["trial_wall_s"] for rows in trials.values())
    overhead = sum(rows[-1]["trial_overhead_s"] for rows in trials.values())
    startups = [rows[0]["startup_s"] for rows in trials.values()]
    epochs = [r["train_time_s"] for rows in trials.values() for r in rows]
    return {
        "trials": len(trials),
        "epochs": len(epochs),
        "sweep_wall_s": run["wall_s"],
        "trial_wall_s": trial_wall,
        "busy_s": busy,
        "overhead_s": overhead,
        "overhead_fraction": overhead / trial_wall,
        "startup_median_s": statistics.median(startups),
        "startup_max_s": max(startups),
        "epoch_train_mean_s": statistics.mean(epochs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-run", help="demo work directory (teacher reused or trained there)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    results = {}
    for name in args.variants.split(","):
        print(f"running the demo sweep: {name} ...", flush=True)
        results[name] = measure(name, workdir)
    print(f"\n# demo sweep, {os.cpu_count()} CPUs; trial clock from process start (or reuse) to last report")
    cols = (
        "trials",
        "epochs",
        "sweep_wall_s",
        "trial_wall_s",
        "busy_s",
        "overhead_s",
        "overhead_fraction",
        "startup_median_s",
        "startup_max_s",
        "epoch_train_mean_s",
    )
    print(f"{'':<22}" + "".join(f"{n:>12}" for n in results))
    for c in cols:
        print(
            f"{c:<22}"
            + "".join(f"{r[c]:>12.3f}" if isinstance(r[c], float) else f"{r[c]:>12}" for r in results.values())
        )
    for name, r in results.items():
        print(f"{name}: overhead fraction {r['overhead_fraction']:.3f} (target < 0.05)")
    if set(VARIANTS) <= results.keys():
        b, o = (results[n] for n in VARIANTS)
        print(
            f"optimised / baseline: sweep wall {o['sweep_wall_s'] / b['sweep_wall_s']:.3f}, median start-up "
            f"{o['startup_median_s'] / b['startup_median_s']:.3f}, mean epoch "
            f"{o['epoch_train_mean_s'] / b['epoch_train_mean_s']:.3f}"
        )


if __name__ == "__main__":
    main()
