"""clockdistill: CLoCKDistill knowledge distillation for DETR detectors."""

__version__ = "0.1.0"
