"""KITTI's own 2-D detection metric, as the object devkit (evaluate_object.cpp) computes it.

Per class (Car at IoU 0.7, Pedestrian and Cyclist at 0.5) and difficulty:

- easy / moderate / hard keep ground truth of box height > 40 / 25 / 25 px, occlusion <= 0 / 1 / 2
  and truncation <= 0.15 / 0.30 / 0.50; other boxes of the class, and the neighbouring classes (Van
  for Car, Person_sitting for Pedestrian), are "ignored": a detection on them is neither a true nor
  a false positive. Detections lower than the difficulty's minimum height (the devkit truncates the
  height to whole pixels) are ignored too. Detections of the class that overlap a DontCare region
  by more than the class's IoU threshold (intersection over the detection's own area) are not false
  positives.
- Matching is per image and greedy over ground truth in file order: each box takes, among the
  unassigned detections above the score threshold, the one of largest IoU (a detection of the
  difficulty's height before an ignored one).
- The 41 score thresholds are taken from the true positives' scores so that recall steps by about
  1/40 (getThresholds); precision at threshold i is max precision at thresholds >= i. AP|R40 is the
  mean of precision[1..40], AP|R11 the mean of precision[0, 4, ..., 40].

What the devkit does with few objects is kept: the precision array is indexed by threshold, not by
recall, and a class with fewer than 40 objects has fewer than 41 thresholds, so the missing recall
points count as precision 0 (one perfectly detected object gives AP|R40 0 and AP|R11 1/11). A class
with no detection gets 0 (the devkit prints nothing for it).

The ground truth is the KITTI fields `clockdistill data kitti` writes on every annotation (raw type,
truncation, occlusion; DontCare and the neighbouring classes included); detections are COCO results
(absolute xywh in the original image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clockdistill.errors import DataError
from clockdistill.metrics import KITTI_CLASSES, KITTI_DIFFICULTIES, kitti_metric

MIN_HEIGHT = (40, 25, 25)
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.3, 0.5)
MIN_OVERLAP = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
NEIGHBOUR = {"Car": "van", "Pedestrian": "person_sitting"}
N_SAMPLE_PTS = 41
KITTI_FIELD = "kitti"  # on each annotation: {"type", "truncated", "occluded"}


def has_kitti_fields(dataset: dict[str, Any]) -> bool:
    """Whether a COCO annotation dict was written by `clockdistill data kitti` with its KITTI fields."""
    anns = dataset.get("annotations", [])
    return bool(anns) and all(KITTI_FIELD in a for a in anns)


def _xyxy(boxes: list[list[float]]) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def box_overlap(det: np.ndarray, gt: np.ndarray, over_det_area: bool = False) -> np.ndarray:
    """(D, G) IoU of xyxy boxes, or intersection over the detection's area (the DontCare rule); no +1
    pixel, as the devkit's 2-D overlap."""
    x1 = np.maximum(det[:, None, 0], gt[None, :, 0])
    y1 = np.maximum(det[:, None, 1], gt[None, :, 1])
    x2 = np.minimum(det[:, None, 2], gt[None, :, 2])
    y2 = np.minimum(det[:, None, 3], gt[None, :, 3])
    w, h = x2 - x1, y2 - y1
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_d = ((det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]))[:, None]
    if over_det_area:
        return np.divide(inter, area_d, out=np.zeros_like(inter), where=inter > 0)
    area_g = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    return np.divide(inter, area_d + area_g - inter, out=np.zeros_like(inter), where=inter > 0)


class _Image:
    """One image's ground truth and detections, as the devkit reads them."""

    def __init__(self, gt: list[dict[str, Any]], dets: list[tuple[str, list[float], float]]):
        self.gt_type = [g[KITTI_FIELD]["type"].lower() for g in gt]
        self.gt_trunc = np.array([float(g[KITTI_FIELD]["truncated"]) for g in gt])
        self.gt_occ = np.array([int(g[KITTI_FIELD]["occluded"]) for g in gt])
        self.gt_box = _xyxy([g["bbox"] for g in gt])
        self.gt_height = self.gt_box[:, 3] - self.gt_box[:, 1]
        self.det_type = [d[0].lower() for d in dets]
        self.det_box = _xyxy([d[1] for d in dets])
        self.det_score = np.array([d[2] for d in dets], dtype=np.float64)
        self.det_height = np.trunc(np.abs(self.det_box[:, 3] - self.det_box[:, 1]))  # int32_t in the devkit
        self.iou = box_overlap(self.det_box, self.gt_box)  # (D, G)
        dc = [i for i, t in enumerate(self.gt_type) if t == "dontcare"]
        self.dc_overlap = box_overlap(self.det_box, self.gt_box[dc], over_det_area=True)  # (D, DC)


class _ClassView:
    """An image seen for one class and difficulty (the devkit's cleanData)."""

    def __init__(self, im: _Image, cls: str, difficulty: int):
        name, overlap = cls.lower(), MIN_OVERLAP[cls]
        ignore = (
            (im.gt_occ > MAX_OCCLUSION[difficulty])
            | (im.gt_trunc > MAX_TRUNCATION[difficulty])
            | (im.gt_height <= MIN_HEIGHT[difficulty])
        )
        valid = np.array([t == name for t in im.gt_type], dtype=bool)
        neighbour = np.array([t == NEIGHBOUR.get(cls) for t in im.gt_type], dtype=bool)
        # 0 counted, 1 ignored (may absorb a detection), -1 not this class
        self.ignored_gt = np.where(valid & ~ignore, 0, np.where(neighbour | (valid & ignore), 1, -1))
        self.n_gt = int((self.ignored_gt == 0).sum())
        det_valid = np.array([t == name for t in im.det_type], dtype=bool)
        self.ignored_det = np.where(im.det_height < MIN_HEIGHT[difficulty], 1, np.where(det_valid, 0, -1)).astype(
            np.int64
        )
        self.score = im.det_score
        self.match = (im.iou > overlap) & (self.ignored_det != -1)[:, None]  # candidate (det, gt) pairs
        # ground truth with a candidate, in file order; the counted ones without any are misses at every threshold
        self.gts = [g for g in range(len(self.ignored_gt)) if self.ignored_gt[g] != -1 and self.match[:, g].any()]
        self.unmatched_gts = self.n_gt - sum(1 for g in self.gts if self.ignored_gt[g] == 0)
        self.iou = im.iou
        dc_cover = (im.dc_overlap > overlap).any(1) if im.dc_overlap.size else np.zeros(len(im.det_score), bool)
        self.counted = (self.ignored_det == 0) & ~dc_cover  # a false positive unless assigned

    def true_positive_scores(self) -> list[float]:
        """The first pass (compute_fp false): each ground truth takes its highest-scoring candidate."""
        assigned = np.zeros(len(self.score), dtype=bool)
        scores = []
        for g in self.gts:
            cand = np.flatnonzero(self.match[:, g] & ~assigned)
            if cand.size == 0:
                continue
            j = cand[np.argmax(self.score[cand])]  # the first of the highest, as the devkit's strict >
            if self.ignored_gt[g] == 0 and self.ignored_det[j] == 0:
                scores.append(float(self.score[j]))
            assigned[j] = True
        return scores

    def statistics(self, thresh: float) -> tuple[int, int, int]:
        """tp, fp, fn at a score threshold (compute_fp true)."""
        available = self.score >= thresh
        assigned = np.zeros(len(self.score), dtype=bool)
        tp, fn = 0, self.unmatched_gts
        for g in self.gts:
            cand = np.flatnonzero(self.match[:, g] & available & ~assigned)
            j = -1
            if cand.size:
                full = cand[self.ignored_det[cand] == 0]
                if full.size:  # the largest overlap among full-height detections (first on ties)
                    j = int(full[np.argmax(self.iou[full, g])])
                else:  # only too-small detections: the first of them
                    j = int(cand[0])
            if j < 0:
                fn += int(self.ignored_gt[g] == 0)
                continue
            if self.ignored_gt[g] == 0 and self.ignored_det[j] == 0:
                tp += 1
            assigned[j] = True
        fp = int((self.counted & available & ~assigned).sum())
        return tp, fp, fn


def thresholds_for(scores: list[float], n_gt: int) -> list[float]:
    """The devkit's getThresholds: scores of true positives spaced for recall steps of 1/40."""
    v = sorted(scores, reverse=True)
    t, current = [], 0.0
    for i, s in enumerate(v):
        left = (i + 1) / n_gt
        right = (i + 2) / n_gt if i < len(v) - 1 else left
        if (right - current) < (current - left) and i < len(v) - 1:
            continue
        t.append(s)
        current += 1.0 / (N_SAMPLE_PTS - 1.0)
    return t


def precision_curve(images: list[_Image], cls: str, difficulty: int) -> np.ndarray:
    """The devkit's 41-entry precision array for one class and difficulty."""
    views = [_ClassView(im, cls, difficulty) for im in images]
    n_gt = sum(v.n_gt for v in views)
    precision = np.zeros(N_SAMPLE_PTS)
    if n_gt == 0:
        return precision
    scores = [s for v in views for s in v.true_positive_scores()]
    thresholds = thresholds_for(scores, n_gt)
    for i, thresh in enumerate(thresholds):
        tp = fp = 0
        for v in views:
            a, b, _ = v.statistics(thresh)
            tp, fp = tp + a, fp + b
        precision[i] = tp / (tp + fp) if tp + fp else 0.0
    for i in range(len(thresholds)):
        precision[i] = precision[i:].max()
    return precision


def ap_r40(precision: np.ndarray) -> float:
    return float(precision[1:].sum() / 40.0)


def ap_r11(precision: np.ndarray) -> float:
    return float(precision[0::4].sum() / 11.0)


def _images(dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int] | None) -> list[_Image]:
    if not has_kitti_fields(dataset):
        raise DataError(
            "KITTI metric: the annotations carry no KITTI fields (type, truncated, occluded); "
            "convert the data set again with `clockdistill data kitti`"
        )
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    ids = sorted(image_ids) if image_ids is not None else sorted(im["id"] for im in dataset["images"])
    gt: dict[int, list] = {i: [] for i in ids}
    for a in dataset["annotations"]:
        if a["image_id"] in gt:
            gt[a["image_id"]].append(a)
    dets: dict[int, list] = {i: [] for i in ids}
    for r in sorted(results, key=lambda r: -r["score"]):  # the order of a result file (write_kitti_results)
        if r["image_id"] in dets:
            dets[r["image_id"]].append((names[r["category_id"]], r["bbox"], r["score"]))
    return [_Image(gt[i], dets[i]) for i in ids]


def kitti_evaluate(
    dataset: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int] | None = None
) -> dict[str, float]:
    """AP|R40 and AP|R11 for every class and difficulty, and the mean over classes at each difficulty
    (fractions, as the COCO metrics), under clockdistill.metrics.kitti_metric's names."""
    images = _images(dataset, results, image_ids)
    out: dict[str, float] = {}
    for d, difficulty in enumerate(KITTI_DIFFICULTIES):
        r40 = []
        for cls in KITTI_CLASSES:
            precision = precision_curve(images, cls, d)
            out[kitti_metric(cls, difficulty)] = ap_r40(precision)
            out[kitti_metric(cls, difficulty, r11=True)] = ap_r11(precision)
            r40.append(out[kitti_metric(cls, difficulty)])
        out[kitti_metric(None, difficulty)] = float(np.mean(r40))
    return out


def format_kitti(stats: dict[str, float]) -> str:
    """The devkit's table: one line per class, AP|R40 (AP|R11) at easy / moderate / hard, in percent."""
    lines = [f"{'KITTI 2-D':<12}" + "".join(f"{d:>20}" for d in KITTI_DIFFICULTIES)]
    for cls in KITTI_CLASSES:
        cells = [
            f"{100 * stats[kitti_metric(cls, d)]:7.2f} ({100 * stats[kitti_metric(cls, d, r11=True)]:6.2f})"
            for d in KITTI_DIFFICULTIES
        ]
        lines.append(f"{cls:<12}" + "".join(f"{c:>20}" for c in cells))
    lines.append(f"{'mean':<12}" + "".join(f"{100 * stats[kitti_metric(None, d)]:>20.2f}" for d in KITTI_DIFFICULTIES))
    lines.append("AP|R40 (AP|R11) at IoU 0.7 for Car, 0.5 for Pedestrian and Cyclist")
    return "\n".join(lines)


def write_kitti_results(dataset: dict[str, Any], results: list[dict[str, Any]], out_dir: str | Path) -> int:
    """Detections in KITTI's result format, one `<image name>.txt` per image of the data set (empty when
    nothing was detected), boxes in original image coordinates; 2-D only (alpha -10, 3-D fields -1 /
    -1000). Returns the number of files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    lines: dict[int, list[str]] = {im["id"]: [] for im in dataset["images"]}
    for r in sorted(results, key=lambda r: -r["score"]):
        if r["image_id"] not in lines:
            continue
        x, y, w, h = r["bbox"]
        lines[r["image_id"]].append(
            f"{names[r['category_id']]} -1 -1 -10 {x:.2f} {y:.2f} {x + w:.2f} {y + h:.2f} "
            f"-1 -1 -1 -1000 -1000 -1000 -10 {r['score']:.6f}"
        )
    for im in dataset["images"]:
        text = "\n".join(lines[im["id"]])
        (out / f"{Path(im['file_name']).stem}.txt").write_text(text + "\n" if text else "")
    return len(dataset["images"])
