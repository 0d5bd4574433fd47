"""Benchmark: does one memory weight alpha work at d_model 64 and 256? (issue 18's scale-free weight)

    python tests/bench/alpha_transfer.py [--workdir study-run/alpha] [--widths 64,256] [--teacher-epochs 6]
                                         [--epochs 2] [--seeds 0,1] [--alphas 0.1,0.3,...,1000]
                                         [--concurrent 2] [--threads 2] [--report-only]

For each width: a hybrid-tiny teacher of that d_model (ffn 4 d, the shipped demo teacher's backbone,
the demo's recipe, --teacher-epochs on the demo's 2000 synthetic images), then a `clockdistill sweep`
of memory-only distillation into a hybrid-tiny student of the same width (ffn 2 d, started from the
teacher's weights, --epochs) over a grid of alpha under distill.memory.normalize=teacher (beta =
alpha / 500, the paper's ratio), plus the student alone, each seed a pair. Finished teachers and
trials are reused.

The raw form (normalize none) needs no runs of its own: the teacher normalisation divides the
squared error by the teacher memory's mean ||t||^2 over the batch's unpadded tokens, so alpha_raw =
alpha / mean ||t||^2 trains the same student up to that mean's batch-to-batch spread (printed). The
report gives, per width, mean ||t||^2 over the validation images, each alpha's AP and paired
difference to the student alone, the best alpha on the grid and a parabola's peak through it and its
neighbours (log alpha); then the ratio of the best alphas across widths in both forms. Target: the
normalised best alphas within a factor 3 of each other, the raw ones not.

README (Distillation) has the figures of one run: seeds 0-1 over the grid (alpha 0.3-1000 at
d_model 256), then a second sweep per width, alpha-d{d}-s2, with seed 2 for the student alone and
alpha 0.3-30 (the report merges every sweep named alpha-d{d} or alpha-d{d}-*). Wall time on 2
cores: teachers 7.5 and about 30 min (one thread each, side by side), sweeps 28 min (d_model 64, one
trial at a time) and 53 min (256, two at a time), the seed-2 sweeps 27 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from clockdistill.checkpoint import epochs_done, load_detector
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.synth import ensure_synthetic
from clockdistill.data.transforms import DetectionTransform, collate
from clockdistill.distill.losses import mean_square_norm
from clockdistill.engine import fit
from sweeps.demo import SHIPPED_TEACHER, TEACHER_DATA, TRAIN
from sweeps.results.report import trial_rows
from sweeps.results.study import compare_methods, half_rise, parabola_peak
from sweeps.tracking import schema as S
from sweeps.tracking.reader import find_sweep, open_client, sweep_trials

ALONE = "none"


def width_fields(d: int, ffn_mult: int) -> dict[str, int]:
    return {"d_model": d, "nheads": 4 if d <= 64 else 8, "ffn_dim": ffn_mult * d}


def build_teacher(workdir: Path, data: Path, d: int, epochs: int) -> Path:
    out = workdir / f"teacher-d{d}"
    if epochs_done(out) >= epochs:
        return out / "best"
    cfg = resolve_config(
        {
            "name": f"teacher-d{d}",
            "data": {"root": str(data), "pad_to": "max_size", "decoded_cache": True},
            "model": {
                "preset": "hybrid-tiny-teacher",
                **width_fields(d, 4),
                "backbone_weights": str(SHIPPED_TEACHER),  # its ResNet
            },
            "train": {**TRAIN, "epochs": epochs, "output_dir": str(out)},
        }
    )
    t0 = time.perf_counter()
    result = fit(cfg)
    logging.info("teacher d_model %d: AP %.4f in %.1f min", d, result.best_ap, (time.perf_counter() - t0) / 60)
    return out / "best"


@torch.no_grad()
def memory_scale(teacher: Path, data: Path, batch: int = 20) -> dict[str, float]:
    """Mean ||t||^2 of the teacher memory over unpadded tokens of the validation images, overall and
    its spread over batches of `batch` (the normalisation's batch-to-batch variation)."""
    model, meta = load_detector(teacher)
    model.eval()
    size = meta["config"]["data"]["max_size"]
    ds = CocoDetection(str(data), "val", DetectionTransform(size, train=False))
    per_batch, weights = [], []
    for start in range(0, len(ds), batch):
        images, mask, _ = collate([ds[i] for i in range(start, min(start + batch, len(ds)))], pad_to=(size, size))
        mem = model.encode(images, mask)
        keep = ~mem.padding_mask
        per_batch.append(float(mean_square_norm(mem.memory, keep)))
        weights.append(float(keep.sum()))
    mean = sum(m * w for m, w in zip(per_batch, weights)) / sum(weights)
    return {"mean": mean, "batch_sd": statistics.stdev(per_batch) if len(per_batch) > 1 else 0.0}


def variant_name(alpha: float) -> str:
    return f"a{alpha:g}"


def write_spec(workdir: Path, data: Path, teacher: Path, d: int, args) -> Path:
    variants = {ALONE: {"distill.method": "none"}}
    for a in args.alphas:
        variants[variant_name(a)] = {"distill.memory.alpha": a, "distill.memory.beta": a / 500}
    spec = {
        "name": f"alpha-d{d}",
        "teacher": str(teacher.resolve()),
        "data": str(data.resolve()),
        "student": "hybrid-tiny-student",
        "epochs": args.epochs,
        "config": {
            "model": width_fields(d, 2),
            "train": {**TRAIN, "warmup_iters": 50},
            "data": {"pad_to": "max_size", "decoded_cache": True},
            "distill": {
                "init_student": True,
                "teacher_cache": "auto",
                "method": "memory_only",
                "memory": {"normalize": "teacher"},
            },
        },
        "variants": variants,
        "search_space": {"variant": {"grid": list(variants)}, "train.seed": {"grid": args.seeds}},
        "search": {"algorithm": "grid"},
        "scheduler": {"type": "none"},
        "objective": {"metric": "AP", "mode": "max"},
        "num_samples": 1,
        "max_concurrent_trials": args.concurrent,
        "resources": {"cpu": 1},
        "storage_path": str((workdir / "sweeps").resolve()),
        "mlflow": {"tracking_uri": tracking_uri(workdir), "experiment": "alpha-transfer"},
    }
    path = workdir / f"alpha-d{d}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def sweep_names(client, d: int) -> list[str]:
    """The sweeps of width d in the store: alpha-d{d} and any alpha-d{d}-<tag> that extended its grid."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], S.sweep_filter())
    ids = {r.data.tags.get(S.SWEEP_ID_TAG, "") for r in runs}
    return sorted(i for i in ids if i == f"alpha-d{d}" or i.startswith(f"alpha-d{d}-"))


def width_result(workdir: Path, d: int, alphas: list[float]) -> dict[str, Any]:
    client = open_client(tracking_uri(workdir))
    rows = []
    for name in sweep_names(client, d):
        sweep = find_sweep(client, name)
        rows += trial_rows(client, sweep, sweep_trials(client, sweep))
    study = compare_methods(rows)
    grid = [a for a in alphas if (study["versus_alone"].get(variant_name(a)) or {}).get("mean") is not None]
    if not grid:
        raise SystemExit(f"alpha-d{d}: no alpha with a finished trial paired to the student alone yet")
    means = [study["methods"][variant_name(a)]["AP"]["mean"] for a in grid]
    gains = [study["versus_alone"][variant_name(a)]["mean"] for a in grid]
    logs = [math.log10(a) for a in grid]
    return {
        "study": study,
        "grid": grid,
        "means": means,
        "gains": gains,
        "best_grid": grid[gains.index(max(gains))],
        "best": 10 ** parabola_peak(logs, gains),
        "half": 10 ** half_rise(logs, gains),
    }


def plot(out: dict[Any, Any], widths: list[int], path: Path) -> Path:
    """AP gain over the student alone (mean of the paired differences) against alpha, left in the
    normalised form, right in the raw one (alpha / mean ||t||^2): one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for d in widths:
        r, scale = out[d], out[d]["scale"]["mean"]
        alphas, gains = r["grid"], [100 * g for g in r["gains"]]
        panels = (
            (axes[0], alphas, r["best_norm"], r["half_norm"]),
            (axes[1], [a / scale for a in alphas], r["best_raw"], r["half_raw"]),
        )
        for ax, xs, best, half in panels:
            (line,) = ax.plot(xs, gains, marker="o", label=f"d_model {d} (mean ||t||^2 {scale:.0f})")
            ax.axvline(best, color=line.get_color(), ls=":", lw=1)
            ax.axvline(half, color=line.get_color(), ls="--", lw=1)
    axes[0].set(xscale="log", xlabel="alpha, normalize=teacher", ylabel="AP gain over the student alone (AP points)")
    axes[1].set(xscale="log", xlabel="the same alpha in the raw form (normalize=none)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Memory weight per width: peak (dotted) and half the best gain (dashed); which form transfers?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(workdir: Path, widths: list[int], alphas: list[float], data: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in widths:
        r = width_result(workdir, d, alphas)
        scale = memory_scale(workdir / f"teacher-d{d}" / "best", data)
        teacher_ap = read_meta(workdir / f"teacher-d{d}" / "best").get("best_ap")
        st = r["study"]
        alone = st["methods"].get(ALONE, {}).get("AP", {})
        print(
            f"\nd_model {d}: teacher AP {teacher_ap:.4f}; mean ||t||^2 {scale['mean']:.2f} "
            f"(sd over batches of 20 images {scale['batch_sd']:.2f}); student alone AP "
            f"{alone.get('mean', float('nan')):.4f} (n {alone.get('n', 0)})"
        )
        print(f"  {'alpha (normalised)':>18} {'alpha raw':>10} {'AP mean':>8} {'sd':>7}  vs alone (paired, 95% CI)")
        for a, m in zip(r["grid"], r["means"]):
            row = st["methods"][variant_name(a)]["AP"]
            diff = st["versus_alone"].get(variant_name(a)) or {}
            ci = f"[{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]" if diff.get("low") is not None else ""
            print(
                f"  {a:>18g} {a / scale['mean']:>10.3g} {m:>8.4f} {row['sd']:>7.4f}  "
                f"{100 * diff.get('mean', float('nan')):+.2f} AP {ci}"
            )
        print(
            f"  best alpha: grid {r['best_grid']:g}, parabola {r['best']:.3g} (normalised) = "
            f"{r['best'] / scale['mean']:.3g} raw; half the best gain at {r['half']:.3g} (normalised) = "
            f"{r['half'] / scale['mean']:.3g} raw"
        )
        out[d] = {"scale": scale, "teacher_ap": teacher_ap}
        for key in ("best", "half"):
            out[d][f"{key}_norm"], out[d][f"{key}_raw"] = r[key], r[key] / scale["mean"]
        out[d]["grid"], out[d]["gains"] = r["grid"], r["gains"]
        out[d]["table"] = {variant_name(a): st["methods"][variant_name(a)]["AP"] for a in r["grid"]}
        out[d]["versus_alone"] = st["versus_alone"]
    if len(widths) == 2:
        lo, hi = widths
        out["ratio"] = {}
        for key, label in (("best", "best alpha (parabola peak)"), ("half", "alpha at half the best gain")):
            norm = out[lo][f"{key}_norm"] / out[hi][f"{key}_norm"]
            raw = out[lo][f"{key}_raw"] / out[hi][f"{key}_raw"]
            out["ratio"][key] = {"normalised": norm, "raw": raw}
            print(
                f"\n{label}, d{lo} / d{hi}: normalised {norm:.2f}x, raw {raw:.2f}x (normalised within 3x: "
                f"{'yes' if 1 / 3 <= norm <= 3 else 'no'}; raw within 3x: {'yes' if 1 / 3 <= raw <= 3 else 'no'})"
            )
    (workdir / "alpha_transfer.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {workdir / 'alpha_transfer.json'} and {plot(out, widths, workdir / 'alpha_transfer.png')}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="study-run/alpha")
    ap.add_argument("--widths", default="64,256", help="d_model of each teacher/student pair")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2, help="student budget (epochs of 2000 images, batch 8)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--alphas", default="0.1,0.3,1,3,10,30,100,300,1000", help="alpha grid under normalize=teacher")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at a time")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the teachers")
    ap.add_argument("--train", type=int, default=TEACHER_DATA["train"], help="training images (synthetic)")
    ap.add_argument("--val", type=int, default=TEACHER_DATA["val"], help="validation images")
    ap.add_argument("--report-only", action="store_true", help="only read the finished sweeps back")
    args = ap.parse_args()
    args.alphas = sorted(float(a) for a in args.alphas.split(","))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_synthetic(workdir / "data", args.train, args.val, TEACHER_DATA["seed"])
    if not args.report_only:
        from sweeps.tune.driver import run_sweep

        torch.set_num_threads(args.threads)
        teachers = {d: build_teacher(workdir, data, d, args.teacher_epochs) for d in widths}
        for d in widths:
            t0 = time.perf_counter()
            run_sweep(write_spec(workdir, data, teachers[d], d, args))
            logging.info("sweep alpha-d%d: %.1f min", d, (time.perf_counter() - t0) / 60)
    report(workdir, widths, args.alphas, data)


if __name__ == "__main__":
    main()
