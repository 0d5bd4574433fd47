"""One distillation run: what `clockdistill distill` and every sweep trial call.

    cfg = distill_config("student.yaml", ["distill.memory.alpha=1e-4"], teacher="runs/teacher/best")
    result = run_distillation(cfg, on_epoch_end=callback)   # callback(epoch, metrics, checkpoint_dir)

Keys the config leaves out are taken from the teacher's checkpoint: the whole `data` section (same
data set, image size and splits) and the student preset (`hybrid-tiny-teacher` -> `hybrid-tiny-student`, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clockdistill.checkpoint import read_meta
from clockdistill.config import Config, apply_overrides, config_from_dict, read_config_file
from clockdistill.data import CocoDetection
from clockdistill.distill.cache import prepare_teacher_cache
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.pairing import init_from_teacher
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.engine import EpochCallback, FitResult, build_datasets, fit, select_device
from clockdistill.errors import ConfigError, DataError
from clockdistill.models import build_detector
from clockdistill.models.presets import student_preset_for as usual_student

log = logging.getLogger(__name__)


def student_preset_for(teacher_preset: str) -> str:
    name = usual_student(teacher_preset)
    if name is None:
        raise ConfigError(
            f"model.preset: no student preset given, and none follows from the teacher's preset {teacher_preset!r} "
            "(set model.preset)"
        )
    return name


def distill_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    teacher: str | Path | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """The config of a distillation run: a YAML file (or the dict `data`), dotted overrides, the
    teacher checkpoint (`teacher` wins over `distill.teacher`), then defaults from the teacher."""
    raw = apply_overrides(data if data is not None else read_config_file(path), list(overrides or []))  # a copy
    section = raw.setdefault("distill", {})
    if not isinstance(section, dict):
        raise ConfigError("distill: expected a mapping of keys to values")
    if teacher is not None:
        section["teacher"] = str(teacher)
    if not section.get("teacher"):
        raise ConfigError(
            "distill.teacher: no teacher checkpoint given (--teacher CKPT, a directory from `clockdistill train`)"
        )
    meta = read_meta(section["teacher"])
    tcfg = meta["config"]
    for name in ("data", "model", "train"):
        if not isinstance(raw.setdefault(name, {}), dict):
            raise ConfigError(f"{name}: expected a mapping of keys to values")
    for key, value in tcfg["data"].items():
        raw["data"].setdefault(key, value)
    raw["model"].setdefault("preset", student_preset_for(tcfg["model"]["preset"]))
    raw["model"].setdefault("num_classes", len(meta["class_names"]))
    raw["train"].setdefault("output_dir", "runs/distill")
    return config_from_dict(raw)


@dataclass
class DistillResult(FitResult):
    teacher_ap: float | None = None
    formula: str = ""


def build_distiller(cfg: Config, teacher: FrozenTeacher, num_classes: int, device: torch.device) -> Distiller:
    """Student (seeded by train.seed, optionally initialised from the teacher) + distiller, on `device`."""
    torch.manual_seed(cfg.train.seed)
    if cfg.model.num_classes != num_classes:  # a new config: the caller's stays as it is
        cfg = cfg.updated({"model.num_classes": num_classes})
    student = build_detector(cfg.model, num_classes)
    if cfg.distill.init_student:
        log.info("init_student: copied %d teacher tensors into the student", init_from_teacher(student, teacher))
    return Distiller(teacher, student, cfg).to(device)


def run_distillation(
    cfg: Config, on_epoch_end: EpochCallback | None = None, datasets: tuple[CocoDetection, CocoDetection] | None = None
) -> DistillResult:
    """Train one student with one distillation setting; `on_epoch_end(epoch, metrics, ckpt_dir)` gets
    AP/AP50/... and every loss term (unweighted), plus `loss_det`, `loss_kd_mem`, `loss_kd_logit`
    (the weighted parts) and `teacher_AP`; returning True stops the run."""
    device = select_device(cfg.train.device)
    teacher = FrozenTeacher.load(cfg.distill.teacher, device)
    train_ds, val_ds = datasets or build_datasets(cfg)
    if train_ds.class_names != teacher.meta["class_names"]:
        raise DataError(
            f"data.root {cfg.data.root}: classes {train_ds.class_names} differ from the teacher's "
            f"{teacher.meta['class_names']}"
        )
    distiller = build_distiller(cfg, teacher, train_ds.num_classes, device)
    distiller.cache = prepare_teacher_cache(cfg, teacher, train_ds, device, wait=False)
    formula = distiller.formula()
    print(formula, flush=True)
    result = fit(cfg, distiller, on_epoch_end, (train_ds, val_ds))
    return DistillResult(**vars(result), teacher_ap=teacher.best_ap, formula=formula)
