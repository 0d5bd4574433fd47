"""The embedded default end to end: synthetic data -> a tiny teacher -> the demo sweep -> the best student.

Each stage is skipped when its output already exists (the teacher resumes from its checkpoint, the
sweep of the same name resumes and reruns nothing finished), so running the demo again is quick.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from clockdistill.config import config_from_dict, parse_yaml
from clockdistill.data.synth import ensure_synthetic
from clockdistill.engine import fit

log = logging.getLogger(__name__)

# Tuned for a 2-core CPU: lr and clipping suit training from scratch (no pretrained backbone here).
TRAIN = {"lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 1.0, "warmup_iters": 200, "batch_size": 8}


def demo_config(name: str, data: Path, preset: str, epochs: int, out: Path):
    return config_from_dict(
        {
            "name": name,
            "data": {"root": str(data)},
            "model": {"preset": preset},
            "train": {**TRAIN, "epochs": epochs, "output_dir": str(out)},
        }
    )


def demo_spec(workdir: Path, trials: int | None = None, epochs: int | None = None) -> Path:
    """sweeps/configs/demo.yaml with its teacher and storage under `workdir` (written there)."""
    import sweeps

    spec: dict[str, Any] = parse_yaml((Path(sweeps.__file__).parent / "configs" / "demo.yaml").read_text())
    spec.update(teacher=str(workdir / "teacher" / "best"), storage_path=str(workdir / "sweeps"))
    if trials:
        spec["num_samples"] = trials
    if epochs:
        spec["epochs"] = epochs
        spec["scheduler"] = {
            **spec.get("scheduler", {}),
            "grace_period": max(1, min(spec["scheduler"].get("grace_period", 1), epochs - 1)),
        }
    path = workdir / "demo-sweep.yaml"
    import json

    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path


def run_demo(
    workdir: Path,
    n_train: int,
    n_val: int,
    teacher_epochs: int,
    trials: int | None = None,
    sweep_epochs: int | None = None,
) -> dict[str, Any]:
    from sweeps.runner import run_sweep

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_synthetic(workdir / "data", n_train, n_val)
    out = workdir / "teacher"
    log.info("training the teacher (hybrid-tiny-teacher, %d epochs) -> %s", teacher_epochs, out)
    teacher = fit(demo_config("teacher", data, "hybrid-tiny-teacher", teacher_epochs, out))
    t1 = time.perf_counter()
    log.info("running the demo sweep")
    summary = run_sweep(demo_spec(workdir, trials, sweep_epochs))
    best = summary.get("best") or {}
    print(f"\n{'model':<28} {'AP':>7}  checkpoint")
    print(f"{'teacher (hybrid-tiny-teacher)':<28} {teacher.best_ap:>7.4f}  {out / 'best'}")
    if best:
        print(f"{'best student (hybrid-tiny-student)':<28} {best['best_AP']:>7.4f}  {best.get('best_checkpoint', '-')}")
        print("winning knobs: " + ", ".join(f"{k}={v}" for k, v in best["config"].items()))
    else:
        print("no trial of the sweep ran its full budget")
    t2 = time.perf_counter()
    exported = _report_and_export(summary["sweep"], workdir) if best else {}
    print(
        f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min (teacher {(t1 - t0) / 60:.1f} min, sweep "
        f"{(t2 - t1) / 60:.1f} min, "
        f"report and export {(time.perf_counter() - t2) / 60:.1f} min)"
    )
    return {"teacher_AP": teacher.best_ap, "best": best, **exported}


def _report_and_export(sweep: str, workdir: Path) -> dict[str, Any]:
    """The sweep report and `best-student` into the work directory; a failure here is reported, and
    the finished sweep stays as it is."""
    from clockdistill.errors import UserError
    from sweeps.best_student import best_student
    from sweeps.report import build_report

    done: dict[str, Any] = {}
    try:
        done["report"] = build_report(sweep, workdir / "report")
        done["export"] = best_student(sweep, out=workdir / "best-student")
    except UserError as exc:
        print(f"demo: {exc}")
    return done
