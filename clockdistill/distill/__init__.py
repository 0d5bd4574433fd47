"""CLoCKDistill and its baselines: frozen teacher, GT location masks, target-aware queries, the Distiller."""

from clockdistill.distill.distiller import Distiller, layer_pairs
from clockdistill.distill.run import distill_config, run_distillation
from clockdistill.distill.teacher import FrozenTeacher

__all__ = ["Distiller", "FrozenTeacher", "distill_config", "layer_pairs", "run_distillation"]
