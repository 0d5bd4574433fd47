"""Hungarian matching of predictions to ground truth (scipy's linear_sum_assignment)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from clockdistill.errors import TrainingDiverged
from clockdistill.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Matching cost of sigmoid-focal classification: (N, C) logits x (M,) labels -> (N, M)."""
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """outputs: pred_logits (B, Q, C), pred_boxes (B, Q, 4) cxcywh; targets: per image labels (n,),
        boxes (n, 4) cxcywh. Returns per image (prediction indices, target indices), both (min(Q, n),)."""
        return self.match_many([(outputs, targets)])[0]

    @torch.no_grad()
    def match_many(
        self, problems: list[tuple[dict[str, Tensor], list[dict[str, Tensor]]]]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """`forward` for several (outputs, targets) at once (a criterion's decoder layers, proposals):
        every cost matrix computed on the device, then one copy of them all to the host (on a GPU each
        copy waits for the queue) and one finiteness check there; the assignments on the host."""
        costs = [self._cost(outputs, targets) for outputs, targets in problems]
        present = [c for c in costs if c is not None]
        flat = torch.cat([c.flatten() for c in present]).cpu() if present else torch.empty(0)
        if not torch.isfinite(flat).all():
            raise TrainingDiverged(
                "the predictions are not finite (NaN or inf in the matching cost): the model has diverged"
            )
        blocks = iter(h.view(c.shape) for h, c in zip(flat.split([c.numel() for c in present]), present))
        empty = torch.empty(0, dtype=torch.int64)
        result = []
        for cost, (_, targets) in zip(costs, problems):
            sizes = [len(t["labels"]) for t in targets]
            if cost is None:
                result.append([(empty, empty) for _ in sizes])
                continue
            block = next(blocks)
            per_image = []
            for i, image in enumerate(block.split(sizes, -1)):
                if sizes[i] == 0:
                    per_image.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(image[i].numpy())
                per_image.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            result.append(per_image)
        return result

    def _cost(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor | None:
        """(B, Q, total targets) matching cost on the device, or None when the batch has no target."""
        B, Q = outputs["pred_logits"].shape[:2]
        if sum(len(t["labels"]) for t in targets) == 0:
            return None
        logits = outputs["pred_logits"].flatten(0, 1)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        cost = (
            self.cost_class * focal_class_cost(logits, tgt_labels, self.alpha, self.gamma)
            + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        )
        return cost.view(B, Q, -1)
