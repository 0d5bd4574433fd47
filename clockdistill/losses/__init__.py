from clockdistill.losses.criterion import (
    SetCriterion,
    detection_weights,
    model_detection_weights,
    sigmoid_focal_loss,
    weighted_sum,
)
from clockdistill.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "detection_weights", "model_detection_weights", "sigmoid_focal_loss",
           "weighted_sum"]  # fmt: skip
