"""Benchmark: does distillation help? Teacher, then the student alone / with vanilla KD / with CLoCKDistill.

    python tests/bench/kd_gain.py [--workdir DIR] [--seeds 3 | --seed-list 0,2] [--epochs 8] [--train 2000] [--val 300]
                                  [--variant NAME:key=value,key=value ...]
                                  [--teacher-set key=value ...] [--student-set key=value ...]

Trains the teacher preset on synthetic data (or reuses <workdir>/teacher/best, e.g. the one that
tests/bench/teacher_quality.py leaves there), then the student preset with the same budget for each
variant and seed, and prints the mean and spread of AP and AP50 with the teacher's AP as reference,
plus the weighted loss parts of the first epoch (how much of the loss each part is: the first thing
to look at when a distillation term does nothing). Finished runs are reused when run again; one
trained with other settings (a changed preset, --student-set, --teacher-set or variant) is refused.
Target (issue 3): CLoCKDistill beats the student alone by >= 2 AP (0.02) and beats vanilla KD.

The DAB-DETR pair in the README (teacher and students from the shipped demo teacher's ResNet):
--teacher-preset dab-detr-tiny-teacher --student-preset dab-detr-tiny-student
--teacher-set model.backbone_weights=sweeps/assets/demo-teacher
--student-set model.backbone_width=0.25 --student-set model.backbone_weights=sweeps/assets/demo-teacher
--variant clock-T1-a10:distill.logit.temperature=1,distill.logit.weight=0.39,distill.memory.normalize=teacher,
distill.memory.alpha=10,distill.memory.beta=0.02 (one argument; and clock-T1 without the memory keys)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clockdistill.checkpoint import epochs_done
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.config.sections import Config
from clockdistill.data.synth import ensure_synthetic
from clockdistill.distill.run import run_distillation
from clockdistill.engine import build_datasets, fit
from sweeps.demo import TRAIN

BASE_VARIANTS = {
    "alone": ["distill.method=none"],
    "vanilla_kd": ["distill.method=vanilla_kd"],
    "clockdistill": ["distill.method=clockdistill"],
}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return name, rest.split(",")


# keys a reused run may differ in: the workdir's paths (runs may be moved between workdirs), the
# epoch count (more epochs resume a run) and the class count (filled in from the data)
FREE_KEYS = ("data.root", "train.output_dir", "distill.teacher", "train.epochs", "model.num_classes")


def refuse_other_settings(output_dir: Path, cfg: Config, prefix: str = "") -> None:
    """A run left in the workdir is resumed, or reused when finished: stop if it was trained with
    other settings under `prefix` (a changed preset, --student-set, --teacher-set or variant)."""
    if not epochs_done(output_dir):
        return
    saved = resolve_config(read_meta(output_dir / "last")["config"]).flatten()
    for key, value in cfg.flatten().items():
        if key.startswith(prefix) and key not in FREE_KEYS and saved.get(key) != value:
            raise SystemExit(
                f"{output_dir}: trained with {key}={saved.get(key)!r}, this run asks {value!r}; "
                "delete it or use another --workdir"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="data, teacher and runs (default: a temp dir)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8, help="student budget in epochs (the same for every variant)")
    ap.add_argument("--teacher-epochs", type=int, default=16)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--teacher-preset", default="hybrid-tiny-teacher")
    ap.add_argument("--student-preset", default="hybrid-tiny-student")
    ap.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the teacher's training (e.g. model.backbone_weights=sweeps/assets/demo-teacher "
        "to start it from the shipped teacher's ResNet, as a real DETR starts from ImageNet)",
    )
    ap.add_argument(
        "--student-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every student (before the variant's own), e.g. model.backbone_width=0.25",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra variant NAME:key=value,... (e.g. "
        "clock_a5e-3:distill.method=clockdistill,distill.memory.alpha=5e-3)",
    )
    ap.add_argument("--only", help="comma list of variants to run (default: all)")
    ap.add_argument(
        "--seed-list",
        help="comma list of the seeds to run instead of 0..seeds-1 (to share a study among processes: give "
        "each its own --workdir with the teacher's linked in, then move the runs into one and run again)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kd-gain-"))
    data = ensure_synthetic(work / "data", args.train, args.val, progress=False)
    teacher = work / "teacher" / "best"
    t0 = time.perf_counter()
    teacher_cfg = resolve_config(
        {
            "name": "teacher",
            "data": {"root": str(data)},
            "model": {"preset": args.teacher_preset},
            "train": {
                **TRAIN,
                "epochs": args.teacher_epochs,
                "output_dir": str(work / "teacher"),
                "progress": False,
            },
        },
        args.teacher_set,
    )
    refuse_other_settings(work / "teacher", teacher_cfg, "model.")  # a teacher_quality.py teacher: its own recipe
    if not (teacher / "meta.json").is_file():
        fit(teacher_cfg)
    teacher_meta = json.loads((teacher / "meta.json").read_text())
    teacher_ap = teacher_meta["best_ap"]
    teacher_ap50 = max(h.get("AP50", 0.0) for h in teacher_meta["history"])
    print(
        f"# teacher {teacher_meta['config']['model']['preset']}: AP {teacher_ap:.4f} AP50 {teacher_ap50:.4f} "
        f"({len(teacher_meta['history'])} epochs; {time.perf_counter() - t0:.0f}s here)"
    )
    print(
        f"# student {args.student_preset}, {args.epochs} epochs on {args.train} images, seeds {seeds}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    variants = dict(BASE_VARIANTS)
    variants.update(parse_variant(v) for v in args.variant)
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    datasets = None
    results: dict[str, list[dict]] = {}
    for name, overrides in variants.items():
        for seed in seeds:
            out = work / "runs" / f"{name}-s{seed}"
            cfg = resolve_config(
                distill=True,
                overrides=[
                    f"model.preset={args.student_preset}",
                    f"train.seed={seed}",
                    f"train.epochs={args.epochs}",
                    f"train.output_dir={out}",
                    "train.progress=false",
                    *(f"train.{k}={v}" for k, v in TRAIN.items()),
                    *args.student_set,
                    *overrides,
                ],
                teacher=teacher,
            )
            refuse_other_settings(out, cfg)
            datasets = datasets or build_datasets(cfg)
            t1 = time.perf_counter()
            res = run_distillation(cfg, datasets=datasets)
            first = res.history[0]
            row = {
                "AP": res.best_ap,
                "AP50": max(h.get("AP50", 0.0) for h in res.history),
                "minutes": (time.perf_counter() - t1) / 60,
                **{k: first.get(k, 0.0) for k in ("loss_det", "loss_kd_mem", "loss_kd_logit")},
            }
            results.setdefault(name, []).append(row)
            print(
                f"{name:<16} seed {seed}: AP {row['AP']:.4f} AP50 {row['AP50']:.4f}  "
                f"(epoch-1 loss det {row['loss_det']:.3f} kd_mem {row['loss_kd_mem']:.4f} kd_logit "
                f"{row['loss_kd_logit']:.3f}; "
                f"{row['minutes']:.1f} min)",
                flush=True,
            )

    def ms(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    print(
        f"\n{'variant':<16} {'AP mean':>8} {'sd':>7} {'AP50 mean':>10} {'sd':>7}  {'kd_mem/det':>10} "
        f"{'kd_logit/det':>12}  per-seed AP"
    )
    print(f"{'teacher':<16} {teacher_ap:>8.4f} {'':>7} {teacher_ap50:>10.4f}")
    for name, rows in results.items():
        (a, sa), (a50, sa50) = ms([r["AP"] for r in rows]), ms([r["AP50"] for r in rows])
        mem = statistics.mean(r["loss_kd_mem"] / r["loss_det"] for r in rows)
        logit = statistics.mean(r["loss_kd_logit"] / r["loss_det"] for r in rows)
        print(
            f"{name:<16} {a:>8.4f} {sa:>7.4f} {a50:>10.4f} {sa50:>7.4f}  {mem:>10.4f} {logit:>12.4f}  "
            + " ".join(f"{r['AP']:.4f}" for r in rows)
        )
    if "alone" in results:
        base = statistics.mean(r["AP"] for r in results["alone"])
        for name, rows in results.items():
            if name != "alone":
                print(f"{name} - alone: {statistics.mean(r['AP'] for r in rows) - base:+.4f} AP")
    (work / "kd_gain.json").write_text(json.dumps({"teacher_AP": teacher_ap, "results": results}, indent=1))


if __name__ == "__main__":
    main()
