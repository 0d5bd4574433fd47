"""The embedded default end to end: synthetic data, a tiny teacher, a tiny student alone and distilled
with CLoCKDistill, their mAPs.

Each stage is skipped when its output already exists (the teacher resumes from its checkpoint), so
running the demo again is quick.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from clockdistill.config import config_from_dict
from clockdistill.data.synth import write_synthetic
from clockdistill.distill import distill_config, run_distillation
from clockdistill.engine import fit

log = logging.getLogger(__name__)

# Tuned for a 2-core CPU: lr and clipping suit training from scratch (no pretrained backbone here).
TRAIN = {"lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 1.0, "warmup_iters": 200, "batch_size": 8}


def demo_config(name: str, data: Path, preset: str, epochs: int, out: Path):
    return config_from_dict(
        {"name": name, "data": {"root": str(data)}, "model": {"preset": preset},
         "train": {**TRAIN, "epochs": epochs, "output_dir": str(out)}}
    )


def run_demo(workdir: Path, n_train: int, n_val: int, teacher_epochs: int, student_epochs: int) -> dict[str, dict]:
    t0 = time.perf_counter()
    data = workdir / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        log.info("writing %d/%d synthetic images to %s", n_train, n_val, data)
        write_synthetic(data, n_train, n_val, seed=0)
    results = {}
    for role, preset, epochs in (("teacher", "tiny-teacher", teacher_epochs), ("student (no KD)", "tiny-student", student_epochs)):
        out = workdir / role.split()[0]
        log.info("training the %s (%s, %d epochs) -> %s", role, preset, epochs, out)
        result = fit(demo_config(role, data, preset, epochs, out))
        results[role] = {"AP": result.best_ap, "AP50": max(h.get("AP50", 0.0) for h in result.history), "checkpoint": str(out / "best")}
    out = workdir / "student-clockdistill"
    log.info("distilling the student from the teacher with CLoCKDistill (%d epochs) -> %s", student_epochs, out)
    cfg = distill_config(None, [f"train.{k}={v}" for k, v in TRAIN.items()] + [f"train.epochs={student_epochs}", f"train.output_dir={out}"],
                         teacher=workdir / "teacher" / "best")
    result = run_distillation(cfg)
    results["student (CLoCKDistill)"] = {"AP": result.best_ap, "AP50": max(h.get("AP50", 0.0) for h in result.history), "checkpoint": str(out / "best")}
    print(f"\n{'model':<18} {'AP':>7} {'AP50':>7}  checkpoint")
    for role, r in results.items():
        print(f"{role:<18} {r['AP']:>7.4f} {r['AP50']:>7.4f}  {r['checkpoint']}")
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    return results
