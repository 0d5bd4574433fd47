"""The detector families: Deformable DETR, DAB-DETR and DINO as their reference implementations, and
this project's hybrid; `build_detector` picks one from a ModelConfig's `arch`."""

from clockdistill.models.common import Detector, Memory, Queries
from clockdistill.models.dab_detr import DABDETR
from clockdistill.models.deformable_detr import DeformableDETR
from clockdistill.models.dino import DINO
from clockdistill.models.hybrid import HybridDETR
from clockdistill.models.presets import PRESETS, preset_fields, student_preset_for

ARCHS = {"deformable": DeformableDETR, "dab": DABDETR, "dino": DINO, "hybrid": HybridDETR}

__all__ = [
    "ARCHS",
    "DABDETR",
    "DINO",
    "DeformableDETR",
    "Detector",
    "HybridDETR",
    "Memory",
    "PRESETS",
    "Queries",
    "build_detector",
    "preset_fields",
    "student_preset_for",
]


def build_detector(cfg, num_classes: int) -> Detector:
    """Build a detector from a ModelConfig; `num_classes` wins over cfg.num_classes when that is 0.
    With `cfg.backbone_weights` the backbone starts from that ImageNet checkpoint."""
    model = ARCHS[cfg.arch](cfg, cfg.num_classes or num_classes)
    if cfg.backbone_weights:
        from clockdistill.weights.backbone import load_backbone_weights

        load_backbone_weights(model.backbone, cfg.backbone_weights)
    return model
