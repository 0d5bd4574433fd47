"""Distillation loss terms, each returned unweighted (the Distiller owns the weights).

memory_terms   LCMD: mask-weighted squared error of the encoder memory, foreground and background
fitnet_term    FitNet baseline: plain mean squared error over every unpadded memory token
logit_terms    one decoder layer's class / L1 / GIoU distillation between corresponding teacher and
               student predictions, weighted by the teacher's confidence (TCLD and vanilla KD)
feature_term   DETRDistill's target-aware feature imitation: the encoder input tokens' squared error
               under masks the teacher's confident queries draw (one per teacher decoder layer)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clockdistill.config.distill import LogitDistillConfig
from clockdistill.distributed import global_mean, world_size
from clockdistill.ops.boxes import box_cxcywh_to_xyxy, box_iou, elementwise_generalized_box_iou


def squared_error(teacher: Tensor, student: Tensor, reduce: str = "sum") -> Tensor:
    """||t - s||^2 per token over channels (`sum`), or its mean over channels (`mean`): (B, N)."""
    d2 = (teacher.float() - student.float()).pow(2)
    return d2.sum(-1) if reduce == "sum" else d2.mean(-1)


NORM_EPS = 1e-6


def mean_square_norm(teacher: Tensor, keep: Tensor) -> Tensor:
    """Mean ||t||^2 over the tokens `keep` (B, N) marks: what normalize=teacher divides by."""
    w = keep.float()
    return ((teacher.float() ** 2).sum(-1) * w).sum() / w.sum().clamp(min=1)


def normalized_squared_error(teacher: Tensor, student: Tensor, keep: Tensor, normalize: str) -> Tensor:
    """The per-token error of a scale-free memory weight (B, N); `keep` (B, N) marks the tokens whose
    teacher statistics count (unpadded, distilled levels).

    channel: sum_c (t_c - s_c)^2 / var_c(t) / C, var over the kept tokens of the batch
    teacher: ||t - s||^2 / mean ||t||^2 over the kept tokens
    Multiplying the memory by k, or repeating its channels, leaves both unchanged."""
    t, st = teacher.float(), student.float()
    w = keep.float().unsqueeze(-1)
    count = w.sum().clamp(min=1)
    with torch.no_grad():
        if normalize == "channel":
            mean = (t * w).sum((0, 1)) / count
            scale = (((t - mean) ** 2) * w).sum((0, 1)) / count  # (C,)
        else:
            scale = mean_square_norm(t, keep)
    d2 = (t - st).pow(2) / (scale + NORM_EPS)
    return d2.mean(-1) if normalize == "channel" else d2.sum(-1)


def memory_terms(
    teacher: Tensor,
    student: Tensor,
    m: Tensor,
    s: Tensor,
    token_mask: Tensor | None = None,
    reduce: str = "sum",
    normalize: str = "none",
    token_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """kd_mem_fg = (1/B) sum M S ||t-s||^2 and kd_mem_bg = (1/B) sum (1-M) S ||t-s||^2.

    teacher, student (B, N, C) memories (student already adapted to the teacher's width); m, s (B, N)
    masks (zero on padded tokens); token_mask (N,) keeps only some levels; `normalize` channel or
    teacher replaces ||t-s||^2 by its scale-free form (normalized_squared_error; `reduce` then unused);
    token_weight (B, N) a sampled cache's weights (distill/compact.py: zero on the tokens it lacks).
    """
    valid = (s > 0).float()  # padded tokens have S = 0; (1 - M) must not bring them back
    if token_mask is not None:
        token_mask = token_mask.float() if token_weight is None else token_weight * token_mask
    elif token_weight is not None:
        token_mask = token_weight
    if normalize == "none":
        d2 = squared_error(teacher, student, reduce)
    else:
        keep = valid if token_mask is None else valid * token_mask
        d2 = normalized_squared_error(teacher, student, keep, normalize)
    if token_mask is not None:
        d2 = d2 * token_mask
    B = teacher.shape[0]
    return {"kd_mem_fg": (m * s * d2).sum() / B, "kd_mem_bg": ((1 - m) * valid * s * d2).sum() / B}


def fitnet_term(
    teacher: Tensor,
    student: Tensor,
    padding_mask: Tensor,
    token_mask: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """Mean over unpadded tokens and channels of (t - s)^2 (token_weight: a sampled cache's weights,
    whose sum over an image is its token count)."""
    keep = (~padding_mask).float()
    if token_mask is not None:
        keep = keep * token_mask
    if token_weight is not None:
        keep = keep * token_weight
    d2 = squared_error(teacher, student, "mean")
    return (d2 * keep).sum() / global_mean(keep.sum()).clamp(min=1)


def confidence_weights(teacher_logits: Tensor, valid: Tensor, cfg: LogitDistillConfig) -> Tensor:
    """Teacher-confidence weight per query (B, K): max_c sigmoid(z_T), squared, or 1; 0 on padding."""
    if cfg.confidence == "none":
        w = torch.ones(teacher_logits.shape[:2], device=teacher_logits.device)
    else:
        w = teacher_logits.float().sigmoid().amax(-1)
        if cfg.confidence == "squared":
            w = w * w
    if cfg.confidence_threshold > 0:
        w = w * (w >= cfg.confidence_threshold)
    return (w * valid).detach()


def class_divergence(teacher_logits: Tensor, student_logits: Tensor, temperature: float, form: str) -> Tensor:
    """Per query (B, K): T^2 * mean over classes of KL(p_T || p_S) at temperature T.

    softmax_kl: p = softmax(z / T) over the classes; binary_kl: per-class Bernoulli p = sigmoid(z / T).
    """
    zt, zs = teacher_logits.float() / temperature, student_logits.float() / temperature
    if form == "softmax_kl":
        log_pt, log_ps = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        kl = log_pt.exp() * (log_pt - log_ps)
    elif form == "binary_kl":
        pt = zt.sigmoid()
        kl = pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
    else:
        raise ValueError(f"unknown class-KD form {form!r}")
    return kl.mean(-1) * temperature**2


def logit_terms(
    teacher: dict[str, Tensor], student: dict[str, Tensor], valid: Tensor, cfg: LogitDistillConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """(cls, l1, giou) for one decoder layer; teacher/student hold pred_logits (B, K, C) and
    pred_boxes (B, K, 4) for the same K queries; valid (B, K) is False on padded slots.

    cls  = sum_k w_k KL_k (cls_norm sum), / sum_k w_k (weight) or / #valid (queries)
    l1   = sum_k w_k mean|b_S - b_T| / sum_k w_k
    giou = sum_k w_k (1 - GIoU(b_S, b_T)) / sum_k w_k
    """
    w = confidence_weights(teacher["pred_logits"], valid, cfg)
    w_sum = global_mean(w.sum()).clamp(min=1e-6)  # normalisers are global under DDP (see clockdistill.distributed)
    kl = class_divergence(teacher["pred_logits"], student["pred_logits"], cfg.temperature, cfg.cls_form)
    cls = (w * kl).sum()
    if cfg.cls_norm == "weight":
        cls = cls / w_sum
    elif cfg.cls_norm == "queries":
        cls = cls / global_mean(valid.sum().float()).clamp(min=1)
    else:
        cls = cls * world_size()  # a plain sum: DDP's gradient average would divide it by the rank count
    bt, bs = teacher["pred_boxes"].float().detach(), student["pred_boxes"].float()
    l1 = (w * (bs - bt).abs().mean(-1)).sum() / w_sum
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(bs.reshape(-1, 4)), box_cxcywh_to_xyxy(bt.reshape(-1, 4)))
    giou_loss = (w * (1 - giou.view(w.shape))).sum() / w_sum
    return cls, l1, giou_loss


def target_aware_mask(layer: dict[str, Tensor], features: Tensor, targets: list[dict], top_k: int) -> Tensor:
    """DETRDistill's mask of one teacher decoder layer over the tokens (B, N): its top_k predictions
    per image (over queries x classes, as its post-processing) weigh their query embeddings' cosine
    similarity to every token; a prediction's weight is its class score times its best IoU with a GT
    box (the score alone in an image without GT). Clamped at 0.01, not yet normalised."""
    logits = layer["pred_logits"].float()
    B, Q, C = logits.shape
    scores, idx = logits.sigmoid().flatten(1).topk(min(top_k, Q * C), dim=1)
    query = idx // C
    weight = scores.clone()
    for b, t in enumerate(targets):
        if len(t["boxes"]):
            boxes = box_cxcywh_to_xyxy(layer["pred_boxes"][b, query[b]].float())
            gt = box_cxcywh_to_xyxy(t["boxes"].to(boxes.device).float())
            weight[b] = weight[b] * box_iou(boxes, gt).max(-1).values
    emb = F.normalize(
        torch.gather(layer["hidden"].float(), 1, query[..., None].expand(-1, -1, layer["hidden"].shape[-1])), dim=-1
    )
    sim = torch.einsum("bkd,bnd->bkn", emb, F.normalize(features.float(), dim=-1))
    return torch.einsum("bkn,bk->bn", sim, weight).clamp(min=1e-2)


def feature_term(
    layers_t: list[dict[str, Tensor]],
    feat_t: Tensor,
    feat_s: Tensor,
    padding_mask: Tensor,
    spatial_shapes: list[tuple[int, int]],
    targets: list[dict],
    top_k: int,
) -> Tensor:
    """sum over teacher layers and levels of the mean (over unpadded tokens and channels) of
    (M * (t - s))^2, M the layer's target-aware mask over its maximum in that level and image. The
    mask holds no gradient: only the student's tokens are pulled."""
    valid = ~padding_mask
    total = feat_s.new_zeros((), dtype=torch.float32)
    diff = feat_t.float() - feat_s.float()
    for layer in layers_t:
        with torch.no_grad():
            mask = target_aware_mask(layer, feat_t, targets, top_k).masked_fill(~valid, 0.0)
        start = 0
        for h, w in spatial_shapes:
            sl = slice(start, start + h * w)
            m = mask[:, sl] / mask[:, sl].amax(1, keepdim=True).clamp(min=1e-6)
            err = (m.unsqueeze(-1) * diff[:, sl]).pow(2).mean(-1)
            total = total + (err * valid[:, sl]).sum() / valid[:, sl].sum().clamp(min=1)
            start += h * w
    return total
