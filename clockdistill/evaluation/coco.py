"""COCO mAP through pycocotools.

Predictions are normalised cxcywh of the image; COCO wants absolute [x, y, w, h] of the original image
and the data set's own category and image ids. `postprocess` keeps the top-k (query, class) pairs by
sigmoid score, as Deformable DETR does.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from clockdistill.metrics import STAT_NAMES
from clockdistill.ops.boxes import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict[str, Tensor], orig_sizes: Tensor, top_k: int = 100) -> list[dict[str, Tensor]]:
    """outputs: pred_logits (B, Q, C), pred_boxes (B, Q, 4); orig_sizes (B, 2) as (h, w).

    Returns per image scores (k,), labels (k,) contiguous indices, boxes (k, 4) absolute xyxy."""
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    B, Q, C = logits.shape
    prob = logits.sigmoid().view(B, -1)
    k = min(top_k, Q * C)
    scores, idx = prob.topk(k, dim=1)
    query, labels = idx // C, idx % C
    xyxy = box_cxcywh_to_xyxy(torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4)))
    h, w = orig_sizes[:, 0].float(), orig_sizes[:, 1].float()
    xyxy = xyxy * torch.stack([w, h, w, h], 1)[:, None, :].to(xyxy.device)
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]


def to_coco_results(
    detections: list[dict[str, Tensor]], image_ids: list[int], label_to_cat: list[int]
) -> list[dict[str, Any]]:
    """Detections of `postprocess` -> COCO result dicts with absolute xywh boxes."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].cpu().numpy().astype(np.float64)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), xywh.tolist()):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat[label]),
                    "bbox": [round(v, 3) for v in box],
                    "score": float(score),
                }
            )
    return results


def quiet_coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    ann: str | Path | dict[str, Any], results: list[dict[str, Any]], image_ids: list[int] | None = None
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l, AR and per-class AP ("AP/<name>") of `results` against the annotation
    file (or loaded dict). `image_ids` restricts evaluation to those images. Empty categories give -1,
    as in pycocotools."""
    dataset = json.loads(Path(ann).read_text()) if not isinstance(ann, dict) else ann
    gt = quiet_coco(dataset)
    ids = sorted(image_ids) if image_ids is not None else sorted(gt.getImgIds())
    if not results:
        stats = {name: 0.0 for name in STAT_NAMES}
        stats.update({f"AP/{c['name']}": 0.0 for c in dataset["categories"]})
        return stats
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # (T IoU, R recall, K classes, A areas, M max-dets)
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        stats[f"AP/{gt.cats[cat_id]['name']}"] = float(p.mean()) if p.size else -1.0
    return stats
