"""D-FINE's localisation losses (Peterande/D-FINE, src/zoo/dfine/dfine_criterion.py), on the outputs of a
detector that regresses boxes as edge distributions (models/dfine.py: `pred_corners`, `ref_points`):

- FGL (fine-grained localisation): each matched query's four edge distributions against its target's
  edge distances from the query's reference box (bbox2distance on the weighting function W(n)), as a
  two-bin cross-entropy split between the bins either side of the target (a distribution focal
  loss), weighted by the predicted box's IoU with the target;
- DDF (decoupled distillation focal): every earlier layer's distributions against the last layer's
  (KL at temperature 5, x T^2), weighted by the last layer's best class probability, on matched
  queries by the layer's IoU instead; matched and unmatched queries averaged apart and mixed by the
  square roots of their counts (per 8 images).

Both use the union matching (`union_matching`): every query paired with the target most of the
decoder layers, the pre-box head and the selected proposals matched it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clockdistill.models.dfine import weighting_function
from clockdistill.ops.boxes import box_cxcywh_to_xyxy, elementwise_box_iou

DDF_TEMPERATURE = 5.0
DDF_BATCH = 8  # the reference's batch-size normaliser of the matched / unmatched counts
TARGET_EPS = 0.1  # targets stay below the last bin by this much (bbox2distance's eps)


def union_matching(matchings: list[list[tuple[Tensor, Tensor]]]) -> list[tuple[Tensor, Tensor]]:
    """Per image: every (query, target) pair of every matching counted; each query keeps the target it
    was paired with most often (equal counts: the smaller target index). Host tensors in, out."""
    out = []
    for per_image in zip(*matchings):
        rows = torch.cat([r for r, _ in per_image])
        cols = torch.cat([c for _, c in per_image])
        if rows.numel() == 0:
            out.append((rows.long(), cols.long()))
            continue
        pairs, counts = torch.unique(torch.stack([rows, cols], 1), dim=0, return_counts=True)
        order = torch.sort(counts, descending=True, stable=True).indices
        chosen: dict[int, int] = {}
        for r, c in pairs[order].tolist():
            chosen.setdefault(r, c)
        out.append(
            (torch.tensor(list(chosen), dtype=torch.int64), torch.tensor(list(chosen.values()), dtype=torch.int64))
        )
    return out


def edge_targets(ref: Tensor, target_xyxy: Tensor, reg_max: int, up: Tensor, reg_scale: Tensor):
    """bbox2distance + translate_gt: (target bin positions (N * 4,), right weights, left weights): each
    edge's distance from the reference box in W(n)'s units, as the bin left of it plus the linear
    interpolation weights of the two bins around it (outside W's range: all weight on the end bin)."""
    scale = abs(reg_scale)
    w, h = ref[:, 2] / scale + 1e-16, ref[:, 3] / scale + 1e-16
    edges = torch.stack(
        [
            (ref[:, 0] - target_xyxy[:, 0]) / w - 0.5 * scale,
            (ref[:, 1] - target_xyxy[:, 1]) / h - 0.5 * scale,
            (target_xyxy[:, 2] - ref[:, 0]) / w - 0.5 * scale,
            (target_xyxy[:, 3] - ref[:, 1]) / h - 0.5 * scale,
        ],
        -1,
    ).reshape(-1)
    values = weighting_function(reg_max, up, reg_scale)
    index = ((values[None] - edges[:, None]) <= 0).sum(1).float() - 1
    right, left = torch.zeros_like(index), torch.zeros_like(index)
    inside = (index >= 0) & (index < reg_max)
    i = index[inside].long()
    d_left, d_right = (edges[inside] - values[i]).abs(), (values[i + 1] - edges[inside]).abs()
    right[inside] = d_left / (d_left + d_right)
    left[inside] = 1.0 - right[inside]
    below, above = index < 0, index >= reg_max
    left[below], index[below] = 1.0, 0.0
    right[above], index[above] = 1.0, reg_max - TARGET_EPS
    return index.clamp(min=0, max=reg_max - TARGET_EPS), right, left


def fgl_loss(corners: Tensor, targets, weight: Tensor, num_boxes: float) -> Tensor:
    """The unimodal distribution focal loss of (N * 4, reg_max + 1) logits, IoU-weighted, / num_boxes."""
    index, right, left = targets
    lo = index.long()
    loss = (
        F.cross_entropy(corners, lo, reduction="none") * left
        + F.cross_entropy(corners, lo + 1, reduction="none") * right
    )
    return (loss * weight.float()).sum() / num_boxes


class LocalLosses:
    """FGL and DDF for one criterion call: the edge targets computed once per query group (the
    reference boxes are every layer's), the matched / unmatched mix of DDF fixed by the matching
    queries and reused for the denoising ones (as the reference does)."""

    def __init__(self, up: Tensor, reg_scale: Tensor, reg_max: int):
        self.up, self.reg_scale, self.reg_max = up, reg_scale, reg_max
        self.mix: tuple[float, float] | None = None

    def group(self, layers: list[dict], targets: list[dict], pairs, num_boxes: float, denoising: bool) -> list[dict]:
        """[{loss_fgl[, loss_ddf]}] for the layers of one query group, first to last; `pairs` the
        (batch, query, target) index vectors on the device. DDF on every layer but the last."""
        b, q, t = pairs
        tgt = torch.cat([x["boxes"] for x in targets]).to(layers[-1]["pred_boxes"].device).float()[t]
        ref = layers[-1]["ref_points"][b, q].detach().float()
        with torch.no_grad():
            edge = edge_targets(ref, box_cxcywh_to_xyxy(tgt), self.reg_max, self.up, self.reg_scale)
        last = layers[-1]
        teacher_corners = last["pred_corners"].detach().float()
        teacher_score = last["pred_logits"].detach().float().sigmoid().max(-1).values  # (B, Q)
        matched = torch.zeros_like(teacher_score, dtype=torch.bool)
        matched[b, q] = True
        if not denoising or self.mix is None:
            scale = DDF_BATCH / teacher_score.shape[0]
            n_pos = 4 * float(matched.sum()) * scale
            self.mix = (n_pos**0.5, (4 * matched.numel() * scale - n_pos) ** 0.5)
        out = []
        for i, layer in enumerate(layers):
            corners = layer["pred_corners"].float()
            iou = elementwise_box_iou(
                box_cxcywh_to_xyxy(layer["pred_boxes"][b, q].float()), box_cxcywh_to_xyxy(tgt)
            ).detach()
            terms = {
                "loss_fgl": fgl_loss(
                    corners[b, q].reshape(-1, self.reg_max + 1), edge, iou.repeat_interleave(4), num_boxes
                )
            }
            if i < len(layers) - 1:
                terms["loss_ddf"] = self._ddf(corners, teacher_corners, teacher_score, matched, (b, q), iou)
            out.append(terms)
        return out

    def _ddf(self, corners, teacher, score, matched, idx, iou) -> Tensor:
        T = DDF_TEMPERATURE
        weight = score.clone()
        weight[idx] = iou.to(weight.dtype)
        kl = F.kl_div(
            F.log_softmax(corners.reshape(-1, self.reg_max + 1) / T, dim=1),
            F.softmax(teacher.reshape(-1, self.reg_max + 1) / T, dim=1),
            reduction="none",
        ).sum(-1)
        loss = weight.repeat_interleave(4, dim=-1).reshape(-1) * T**2 * kl
        mask = matched.repeat_interleave(4, dim=-1).reshape(-1)
        pos = loss[mask].mean() if bool(mask.any()) else loss.sum() * 0
        neg = loss[~mask].mean() if bool((~mask).any()) else loss.sum() * 0
        w_pos, w_neg = self.mix
        return (pos * w_pos + neg * w_neg) / (w_pos + w_neg)
