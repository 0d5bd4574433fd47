from clockdistill.models.detector import DETR
from clockdistill.models.presets import PRESETS, preset_fields

__all__ = ["DETR", "PRESETS", "preset_fields", "build_detector"]


def build_detector(cfg, num_classes: int) -> DETR:
    """Build a detector from a ModelConfig; `num_classes` wins over cfg.num_classes when that is 0."""
    return DETR(cfg, cfg.num_classes or num_classes)
