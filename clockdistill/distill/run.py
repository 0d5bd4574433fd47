"""One distillation run: what `clockdistill distill` and every sweep trial call.

    cfg = resolve_config("student.yaml", overrides=["distill.memory.alpha=1e-4"], distill=True,
                         teacher="runs/teacher/best")
    result = run_distillation(cfg, on_epoch_end=callback)   # callback(epoch, metrics, checkpoint_dir)

(config/layers.py: keys the config leaves out come from the teacher's checkpoint.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from clockdistill.config.sections import Config
from clockdistill.data.dataset import CocoDetection
from clockdistill.distill.cache import prepare_teacher_cache
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.exchange import TeacherExchange
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.engine import EpochCallback, FitResult, build_datasets, fit, select_device
from clockdistill.errors import DataError
from clockdistill.models.build import build_detector

log = logging.getLogger(__name__)


@dataclass
class DistillResult(FitResult):
    teacher_ap: float | None = None
    formula: str = ""


def build_distiller(cfg: Config, teacher: FrozenTeacher, num_classes: int, device: torch.device) -> Distiller:
    """A fresh student (seeded by train.seed) and its distiller, on `device`; `fit` applies the
    student's starting weights (distill.init_student, model.backbone_weights) when the run starts."""
    torch.manual_seed(cfg.train.seed)
    if cfg.model.num_classes != num_classes:  # a new config: the caller's stays as it is
        cfg = cfg.updated({"model.num_classes": num_classes})
    return Distiller(teacher, build_detector(cfg.model, num_classes), cfg).to(device)


def run_distillation(
    cfg: Config,
    on_epoch_end: EpochCallback | None = None,
    datasets: tuple[CocoDetection, CocoDetection] | None = None,
    exchange: TeacherExchange | None = None,
) -> DistillResult:
    """Train one student with one distillation setting; `on_epoch_end(epoch, metrics, ckpt_dir)` gets
    AP/AP50/... and every loss term (unweighted), plus `loss_det`, `loss_kd_mem`, `loss_kd_logit`
    (the weighted parts) and `teacher_AP`; returning True stops the run. `exchange`: teacher outputs
    shared with other runs on the same batches (distill/exchange.py; a sweep's trials)."""
    device = select_device(cfg.train.device)
    teacher = FrozenTeacher.load(cfg.distill.teacher, device, cfg.distill.teacher_padding)
    train_ds, val_ds = datasets or build_datasets(cfg)
    if train_ds.class_names != teacher.meta["class_names"]:
        raise DataError(
            f"data.root {cfg.data.root}: classes {train_ds.class_names} differ from the teacher's "
            f"{teacher.meta['class_names']}"
        )
    distiller = build_distiller(cfg, teacher, train_ds.num_classes, device)
    distiller.cache = prepare_teacher_cache(cfg, teacher, train_ds, device, wait=False)
    distiller.exchange = exchange
    if exchange is None and cfg.distill.teacher_share != "off":
        log.info(
            "distill.teacher_share: %s shares the teacher between a sweep's trials; this run has it alone",
            cfg.distill.teacher_share,
        )
    formula = distiller.formula()
    print(formula, flush=True)
    result = fit(cfg, distiller, on_epoch_end, (train_ds, val_ds))
    return DistillResult(**vars(result), teacher_ap=teacher.best_ap, formula=formula)
