"""Detection criterion: sigmoid focal (or varifocal) classification, L1 and GIoU box terms, on every
decoder layer.

The criterion returns *unweighted* named terms (`loss_cls`, `loss_bbox`, `loss_giou`; aux layers get a
suffix `_0`, `_1`, ...). `detection_weights` builds the weight map and `weighted_sum` combines them, so
every term can be logged on its own and the total is auditable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clockdistill.config.sections import LossConfig
from clockdistill.distributed import global_mean
from clockdistill.losses.fdr import LocalLosses, union_matching
from clockdistill.losses.matcher import HungarianMatcher
from clockdistill.ops.boxes import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from clockdistill.ops.host import to_device_async

TERMS = ("loss_cls", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of logits against {0, 1} targets, same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def varifocal_loss(logits: Tensor, target_score: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise varifocal loss (Zhang et al. 2021, as RT-DETR computes it): BCE against the IoU-aware
    score `target_score` (the matched box's IoU on its class, else 0), negatives weighted by
    alpha * p^gamma, positives by their score; `target` is the {0, 1} class target."""
    pred = logits.sigmoid().detach()
    weight = alpha * pred.pow(gamma) * (1 - target) + target_score
    return F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_loss: bool = True,
        cls_loss: str = "focal",
        vfl_alpha: float = 0.75,
    ):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.focal_alpha, self.focal_gamma, self.aux_loss = focal_alpha, focal_gamma, aux_loss
        self.cls_loss, self.vfl_alpha = cls_loss, vfl_alpha

    @classmethod
    def from_config(cls, cfg: LossConfig, num_classes: int) -> "SetCriterion":
        matcher = HungarianMatcher(
            cfg.match_cost_class, cfg.match_cost_bbox, cfg.match_cost_giou, cfg.focal_alpha, cfg.focal_gamma
        )
        return cls(num_classes, matcher, cfg.focal_alpha, cfg.focal_gamma, cfg.aux_loss, cfg.cls_loss, cfg.vfl_alpha)

    def layer_losses(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        num_boxes: float,
        indices: list[tuple[Tensor, Tensor]] | None = None,
        box_pairs: tuple[tuple[Tensor, Tensor, Tensor], float] | None = None,
    ) -> dict[str, Tensor]:
        """The three terms for one decoder layer's predictions, each normalised by the box count;
        queries paired with targets by Hungarian matching, or by the given `indices` (per image:
        query indices, target indices), as for denoising queries. Unpaired queries are no-object.
        `box_pairs` ((batch, query, target) index vectors, their count): the box terms on these pairs
        instead (D-FINE's union matching)."""
        logits = outputs["pred_logits"].float()  # (B, Q, C)
        boxes = outputs["pred_boxes"].float()  # (B, Q, 4)
        device = logits.device
        if indices is None:
            indices = self.matcher(outputs, targets)
        batch_idx, src_idx, tgt_idx = pair_vectors(indices, targets, device)
        target_classes = torch.zeros_like(logits)
        all_labels = torch.cat([t["labels"] for t in targets]).to(device)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
        matched_labels = all_labels[tgt_idx]
        target_classes[batch_idx, src_idx, matched_labels] = 1.0
        src_xyxy = box_cxcywh_to_xyxy(boxes[batch_idx, src_idx])
        tgt_xyxy = box_cxcywh_to_xyxy(all_boxes[tgt_idx])
        if self.cls_loss == "vfl":
            score = torch.zeros_like(logits)
            score[batch_idx, src_idx, matched_labels] = elementwise_box_iou(src_xyxy, tgt_xyxy).detach()
            cls = varifocal_loss(logits, score, target_classes, self.vfl_alpha, self.focal_gamma)
        else:
            cls = sigmoid_focal_loss(logits, target_classes, self.focal_alpha, self.focal_gamma)
        loss_cls = cls.sum() / num_boxes
        box_num = num_boxes
        if box_pairs is not None:
            (batch_idx, src_idx, tgt_idx), box_num = box_pairs
        src_boxes, tgt_boxes = boxes[batch_idx, src_idx], all_boxes[tgt_idx]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / box_num
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / box_num
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def denoising_losses(
        self,
        outputs: dict,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
        local: LocalLosses | None = None,
    ) -> dict[str, Tensor]:
        """`*_dn` (last layer) and `*_dn_<i>` (earlier layers) terms of the denoising queries' outputs:
        positives reconstruct their GT, negatives and padding are no-object (DINO); D-FINE's
        localisation terms on them and its pre-box head's terms (`*_dn_pre`) with `local`."""
        losses = {f"{k}_dn": v for k, v in self.layer_losses(outputs, targets, num_boxes, indices).items()}
        aux = outputs.get("aux_outputs", []) if self.aux_loss else []
        for i, layer in enumerate(aux):
            terms = self.layer_losses(layer, targets, num_boxes, indices)
            losses.update({f"{k}_dn_{i}": v for k, v in terms.items()})
        if local is not None:
            if "pre_outputs" in outputs:
                terms = self.layer_losses(outputs["pre_outputs"], targets, num_boxes, indices)
                losses.update({f"{k}_dn_pre": v for k, v in terms.items()})
            pairs = pair_vectors(indices, targets, outputs["pred_logits"].device)
            groups = local.group([*aux, outputs], targets, pairs, num_boxes, denoising=True)
            for suffix, terms in zip([*(f"_{i}" for i in range(len(aux))), ""], groups):
                losses.update({f"{k}_dn{suffix}": v for k, v in terms.items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        num_boxes = max(global_mean(float(sum(len(t["labels"]) for t in targets))), 1.0)  # DDP: the global mean count
        # every matched set of predictions: (suffix, outputs, targets); matched together (one host copy)
        sets = [("", outputs, targets)]
        if self.aux_loss:
            sets += [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:  # two-stage proposals: class-agnostic, every object is class 0
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            sets.append(("_enc", outputs["enc_outputs"], agnostic))
        if "interm_outputs" in outputs:  # DINO's selected proposals: matched with their real labels
            sets.append(("_interm", outputs["interm_outputs"], targets))
        local = None
        if "pred_corners" in outputs:  # D-FINE: its pre-box head supervised, box terms on the union matching
            local = LocalLosses(outputs["fdr_up"], outputs["fdr_reg_scale"], outputs["pred_corners"].shape[-1] // 4 - 1)
            sets.append(("_pre", outputs["pre_outputs"], targets))
        matched = self.matcher.match_many([(o, t) for _, o, t in sets])
        box_pairs = None
        if local is not None:
            union = union_matching(matched)
            count = max(global_mean(float(sum(len(r) for r, _ in union))), 1.0)
            box_pairs = (pair_vectors(union, targets, outputs["pred_logits"].device), count)
        losses = {}
        for (suffix, o, t), indices in zip(sets, matched):
            terms = self.layer_losses(o, t, num_boxes, indices, box_pairs)
            losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        if local is not None:
            aux = outputs.get("aux_outputs", []) if self.aux_loss else []
            groups = local.group([*aux, outputs], targets, box_pairs[0], box_pairs[1], denoising=False)
            for suffix, terms in zip([*(f"_{i}" for i in range(len(aux))), ""], groups):
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        if "dn" in outputs:  # denoising queries: fixed pairs, normalised by the box count x groups
            dn = outputs["dn"]
            losses.update(self.denoising_losses(dn["outputs"], targets, dn["indices"], num_boxes * dn["groups"], local))
        return losses


def pair_vectors(indices: list[tuple[Tensor, Tensor]], targets: list[dict], device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (query, target) pairs -> (batch, query, target-in-the-concatenation) index vectors on
    `device`, moved in one asynchronous copy each when on the host (the matcher's)."""
    offsets = [0]
    for t in targets[:-1]:
        offsets.append(offsets[-1] + len(t["labels"]))
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    tgt_idx = torch.cat([tgt + off for (_, tgt), off in zip(indices, offsets)])
    return tuple(to_device_async(x, device) for x in (batch_idx, src_idx, tgt_idx))


def detection_weights(
    cfg: LossConfig,
    num_aux: int,
    proposals: bool = False,
    denoising: bool = False,
    interm: bool = False,
    fdr: bool = False,
) -> dict[str, float]:
    """Weight of every term the criterion returns: aux layers included, a two-stage Deformable DETR's
    proposal terms (`*_enc`) when `proposals`, denoising terms (`*_dn`, `*_dn_<i>`) when `denoising`,
    DINO's selected proposals (`*_interm`) when `interm`, D-FINE's FGL and DDF terms and its pre-box
    head's (`*_pre`) when `fdr`."""
    base = {"loss_cls": cfg.cls, "loss_bbox": cfg.bbox, "loss_giou": cfg.giou}
    layer = {**base, "loss_fgl": cfg.fgl} if fdr else base
    earlier = {**layer, "loss_ddf": cfg.ddf} if fdr else base
    weights = dict(layer)
    aux = range(num_aux) if cfg.aux_loss else ()
    for i in aux:
        weights.update({f"{k}_{i}": w for k, w in earlier.items()})
    if fdr:
        weights.update({f"{k}_pre": w for k, w in base.items()})
    if denoising:
        weights.update({f"{k}_dn": w for k, w in layer.items()})
        for i in aux:
            weights.update({f"{k}_dn_{i}": w for k, w in earlier.items()})
        if fdr:
            weights.update({f"{k}_dn_pre": w for k, w in base.items()})
    if proposals:
        weights.update({f"{k}_enc": w for k, w in base.items()})
    if interm:
        weights.update({f"{k}_interm": w for k, w in base.items()})
    return weights


def model_detection_weights(cfg: LossConfig, model_cfg) -> dict[str, float]:
    """`detection_weights` for a detector's config."""
    selects = model_cfg.arch in ("dino", "rtdetr", "dfine")  # query selection supervised with the real labels
    return detection_weights(
        cfg,
        model_cfg.dec_layers - 1,
        model_cfg.two_stage,
        denoising=selects and model_cfg.dn_number > 0,
        interm=selects,
        fdr=model_cfg.arch == "dfine",
    )


def weighted_sum(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * losses[k]. A term without a weight is an error, not silently dropped."""
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise KeyError(f"no weight for loss terms {missing}")
    return sum(weights[k] * v for k, v in losses.items())
