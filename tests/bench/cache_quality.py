"""Benchmark: do students trained from the sampled teacher cache match those of the live teacher?

    python tests/bench/cache_quality.py --teacher DIR --data DIR [--init-from DIR] [--seeds 3] [--epochs 3]
                                        [--background 64] [--dtype int8] [--workdir DIR]

For each seed, the same student (same initialisation, same batches: the seed fixes both) is
distilled twice with CLoCKDistill on batches padded to their largest image (`data.pad_to: batch`,
the cache's image layout): once from the live teacher, once from the sampled cache (the boxes' tokens
in full, `--background` others per image and view, reweighted; `--dtype` values). Printed: each
pair's AP at the last epoch on the validation split (no epoch chosen on it), the paired differences
(cache - live) with their mean and a 95% t interval, and the first epoch's memory loss of both.
The teacher runs padding-invariant in both. `make` does not run this (minutes of both cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from clockdistill.config.layers import resolve_config
from clockdistill.distill.run import run_distillation
from clockdistill.engine import build_datasets
from sweeps.results.study import paired_difference

TRAIN = {"batch_size": 8, "lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 1.0, "warmup_iters": 50}
# the scale-free memory weight at the gain's plateau (tests/bench/alpha_transfer.py): the memory terms
# matter here, so that a cache that got them wrong would show
DISTILL = {
    "method": "clockdistill",
    "memory": {"normalize": "teacher", "alpha": 8.0, "beta": 0.02},
    "logit": {"temperature": 1, "weight": 0.39},
}


def run(args, seed: int, cached: bool, out: Path, datasets):
    cache = (
        {
            "teacher_cache": "on",
            "teacher_cache_memory": "sampled",
            "teacher_cache_background": args.background,
            "teacher_cache_dtype": args.dtype,
        }
        if cached
        else {"teacher_cache": "off"}
    )
    cfg = resolve_config(
        distill=True,
        config={
            "data": {"root": args.data, "pad_to": "batch", "pad_multiple": 64, "cache_dir": str(out.parent / "cache")},
            "model": {"preset": args.student},
            "train": {
                **TRAIN,
                "seed": seed,
                "epochs": args.epochs,
                "output_dir": str(out),
                "progress": False,
                **({"init_from": args.init_from} if args.init_from else {}),
            },
            "distill": {**DISTILL, **cache},
        },
        teacher=args.teacher,
    )
    res = run_distillation(cfg, datasets=datasets)
    return {"AP": res.history[-1]["AP"], "kd_mem": res.history[0].get("loss_kd_mem", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    ap.add_argument("--data", required=True, help="COCO-format data set (train and val splits)")
    ap.add_argument("--student", default="hybrid-tiny-student", help="student preset")
    ap.add_argument("--init-from", default="", help="the student's starting weights")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--background", type=int, default=64, help="background tokens per image and view")
    ap.add_argument("--dtype", choices=("fp16", "int8"), default="int8")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cache-quality-"))
    datasets = None
    rows = []
    for seed in range(args.seeds):
        pair = {}
        for cached in (False, True):
            out = work / f"{'cache' if cached else 'live'}-s{seed}"
            if datasets is None:
                base = resolve_config({"data": {"root": args.data, "pad_to": "batch", "pad_multiple": 64}})
                datasets = build_datasets(base)
            pair["cache" if cached else "live"] = run(args, seed, cached, out, datasets)
        rows.append(pair)
        print(
            f"seed {seed}: last-epoch AP live {pair['live']['AP']:.4f} cache {pair['cache']['AP']:.4f} "
            f"({pair['cache']['AP'] - pair['live']['AP']:+.4f}); epoch-1 kd_mem live {pair['live']['kd_mem']:.4f} "
            f"cache {pair['cache']['kd_mem']:.4f}",
            flush=True,
        )
    d = paired_difference(
        {s: r["cache"]["AP"] for s, r in enumerate(rows)}, {s: r["live"]["AP"] for s, r in enumerate(rows)}
    )
    live = statistics.mean(r["live"]["AP"] for r in rows)
    print(
        f"\n{args.student} from {args.teacher}: {args.seeds} seeds x {args.epochs} epochs; live AP {live:.4f}; "
        f"cache ({args.background} background tokens, {args.dtype}) - live: {d['mean']:+.4f} AP, "
        f"95% interval [{d['low']:+.4f}, {d['high']:+.4f}]"
    )
    (work / "cache_quality.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
