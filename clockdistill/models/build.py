"""`build_detector`: a detector of the family a ModelConfig's `arch` names, with fresh weights.

Construction reads no file: starting weights (an ImageNet backbone, a checkpoint to fine-tune, the
teacher's tensors) are applied when a run starts fresh (weights/start.py), and a checkpoint's
weights by checkpoint.load_detector."""

from __future__ import annotations

from clockdistill.config.sections import ModelConfig
from clockdistill.models.common import Detector
from clockdistill.models.dab_detr import DABDETR
from clockdistill.models.deformable_detr import DeformableDETR
from clockdistill.models.dfine import DFINE
from clockdistill.models.dino import DINO
from clockdistill.models.hybrid import HybridDETR
from clockdistill.models.rtdetr import RTDETR

ARCHS = {
    "deformable": DeformableDETR,
    "dab": DABDETR,
    "dino": DINO,
    "hybrid": HybridDETR,
    "rtdetr": RTDETR,
    "dfine": DFINE,
}


def build_detector(cfg: ModelConfig, num_classes: int) -> Detector:
    """A freshly initialised detector; `num_classes` counts when cfg.num_classes is 0."""
    return ARCHS[cfg.arch](cfg, cfg.num_classes or num_classes)
