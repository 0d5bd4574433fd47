"""A fresh run's starting weights: the one place they are applied.

`fit` calls `apply_starting_weights` once, when a run starts from nothing; a resumed run has its
own weights, and a saved checkpoint loads from its own directory alone (the files named below are
never read again after the start). In order, each later source overwriting what an earlier one set:

    1. model.backbone_weights  an ImageNet ResNet (torchvision or Hugging Face layout) or a
                               clockdistill checkpoint's backbone, into the backbone (backbone.py)
    2. distill.init_student    every teacher tensor whose name and shape the student shares
    3. train.init_from         a checkpoint to fine-tune; class heads follow the classes (finetune.py)
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from clockdistill.config.sections import Config
from clockdistill.weights.backbone import load_backbone_weights
from clockdistill.weights.finetune import init_from_checkpoint

log = logging.getLogger(__name__)


def apply_starting_weights(model: nn.Module, cfg: Config, class_names: list[str], teacher: Any = None) -> None:
    """Apply the config's starting weights to a freshly built `model` (see above). `teacher` is the
    frozen teacher of a distillation run (its `.detector`), for distill.init_student."""
    if cfg.model.backbone_weights:
        count = load_backbone_weights(model.backbone, cfg.model.backbone_weights)
        log.info("model.backbone_weights: %d tensors from %s", count, cfg.model.backbone_weights)
    if cfg.distill.init_student and teacher is not None:
        log.info(
            "distill.init_student: copied %d teacher tensors into the student", copy_shared(teacher.detector, model)
        )
    if cfg.train.init_from:
        init_from_checkpoint(model, cfg.train.init_from, class_names, cfg.train.class_map)


def copy_shared(source: nn.Module, target: nn.Module) -> int:
    """Copy every tensor of `source` whose name and shape `target` shares; returns how many."""
    own = target.state_dict()
    copied = {k: v.clone() for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(copied, strict=False)
    return len(copied)
