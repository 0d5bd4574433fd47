"""COCO AP with bootstrap intervals over images, from one per-image matching.

pycocotools matches each image's detections to its ground truth (`COCOeval.evaluate`) and then
accumulates precision over all images. A bootstrap resample draws the images again with
replacement; an image drawn twice counts twice. So the matching is done once per model
(`match_images`), and a resample is a vector of image counts: each detection's true- and
false-positive flags are weighted by its image's count before the cumulative sums of
COCOeval.accumulate, and each image's ground truth count likewise. With every count 1 this is
pycocotools' own AP (tested to 1e-6). Models compared on the same resamples give paired intervals:
two identical models differ by exactly 0 on every resample.

    matches = {name: match_images(ground_truth, results[name], image_ids) for name in results}
    report = bootstrap(matches, pairs=[("champion", "baseline")], resamples=1000)
    report["models"]["champion"]   # {"AP": 0.41, "low": 0.38, "high": 0.44}
    report["differences"]["champion - baseline"]
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

from clockdistill.evaluation.coco import quiet_coco

REC_THRS = np.linspace(0.0, 1.0, 101)  # pycocotools' recall thresholds
MAX_DETS = 100  # AP at 100 detections per image, as pycocotools' AP
_CELLS = 20_000_000  # resamples x IoU thresholds x detections held at once (memory)


@dataclass
class CategoryMatches:
    """One category's detections over a split, in the order COCOeval.accumulate sorts them, split per
    IoU threshold into true positives (matched, not ignored) and false positives (neither)."""

    tp_image: list[np.ndarray]  # per threshold: each true positive's image index, in score order
    fp_image: list[np.ndarray]  # per threshold: each false positive's image index, in score order
    fp_before: list[np.ndarray]  # per threshold: how many false positives precede each true positive
    gt: np.ndarray  # (N,) ground-truth boxes per image that count (not crowd, not ignored)


@dataclass
class Matches:
    """One model's detections on a split, matched to the ground truth once."""

    image_ids: list[int]
    categories: list[CategoryMatches]  # the categories that have ground truth or detections


def match_images(ground_truth: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int]) -> Matches:
    """Per-image matching of COCO `results` (image_id, category_id, bbox xywh, score) on `image_ids`
    of the annotation dict `ground_truth`, as pycocotools' bbox evaluation (area 'all', 100 dets)."""
    ids = sorted(image_ids)
    gt = quiet_coco(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results) if results else quiet_coco({**ground_truth, "annotations": []})
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]  # all
        ev.evaluate()
    n = len(ids)
    categories = []
    for k in range(len(ev.params.catIds)):
        evals = [(i, e) for i, e in enumerate(ev.evalImgs[k * n : (k + 1) * n]) if e is not None]
        if not evals:
            continue
        scores = np.concatenate([e["dtScores"][:MAX_DETS] for _, e in evals])
        order = np.argsort(-scores, kind="mergesort")  # as accumulate: stable, images in id order
        image = np.concatenate([np.full(len(e["dtScores"][:MAX_DETS]), i, np.int64) for i, e in evals])[order]
        matched = np.concatenate([e["dtMatches"][:, :MAX_DETS] for _, e in evals], axis=1)[:, order] > 0
        ignored = np.concatenate([e["dtIgnore"][:, :MAX_DETS] for _, e in evals], axis=1)[:, order] > 0
        counts = np.zeros(n)
        for i, e in evals:
            counts[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        tp, fp = matched & ~ignored, ~matched & ~ignored
        categories.append(
            CategoryMatches(
                [image[row] for row in tp],
                [image[row] for row in fp],
                [np.cumsum(f)[t] for t, f in zip(tp, fp)],
                counts,
            )
        )
    return Matches(ids, categories)


def _split_by_threshold(image: np.ndarray, tp: np.ndarray, fp: np.ndarray, gt: np.ndarray) -> CategoryMatches:
    """Per IoU threshold: the true positives' images, the false positives before the last true positive
    (those after it change no precision that counts) and how many of them precede each true positive."""
    tp_image, fp_image, fp_before = [], [], []
    for tp_row, fp_row in zip(tp, fp):
        last = np.flatnonzero(tp_row)[-1] + 1 if tp_row.any() else 0
        fp_row = fp_row[:last]
        tp_image.append(image[tp_row])
        fp_image.append(image[:last][fp_row])
        fp_before.append(np.cumsum(fp_row)[tp_row[:last]])
    return CategoryMatches(tp_image, fp_image, fp_before, gt)


def average_precision(matches: Matches, counts: np.ndarray | None = None, iou: int | None = None) -> np.ndarray:
    """AP (over IoU 0.50:0.95, or the threshold index `iou`: 0 = AP50, 5 = AP75) for each row of
    image counts `counts` (R, N); None: every image once, pycocotools' own AP. Returns (R,)."""
    if counts is None:
        counts = np.ones((1, len(matches.image_ids)))
    thresholds = range(10) if iou is None else [iou]
    counts_t = np.ascontiguousarray(counts.T, dtype=np.float32)  # (N, R): small integers, exact in float32
    totals, cells = np.zeros(len(counts)), np.zeros(len(counts))
    for cat in matches.categories:
        npig = counts @ cat.gt  # (R,)
        present = npig > 0  # a category without ground truth in a resample is left out (-1 in pycocotools)
        size = max(1, max(len(cat.tp_image[t]) + len(cat.fp_image[t]) for t in thresholds))
        step = max(1, _CELLS // size)
        for t in thresholds:
            for start in range(0, len(counts), step):
                rows = slice(start, start + step)
                q = _precision_at_recalls(
                    counts_t[:, rows], cat.tp_image[t], cat.fp_image[t], cat.fp_before[t], npig[rows]
                )
                totals[rows] += np.where(present[rows], q.sum(axis=1), 0.0)
                cells[rows] += np.where(present[rows], len(REC_THRS), 0)
    return np.where(cells > 0, totals / np.maximum(cells, 1), -1.0)


def _precision_at_recalls(counts, tp_image, fp_image, fp_before, npig) -> np.ndarray:
    """COCOeval.accumulate's interpolated precision at the 101 recall thresholds for one category and
    IoU threshold, for each column of image counts (N, r). Returns (r, 101).

    Recall rises only at true positives, and a false positive's precision is below the true positive
    before it, so the envelope (the best precision at this recall or beyond) and the first position
    reaching each recall threshold are those of the true positives alone: the false positives only
    count, through `fp_before`, in the precision of the true positives after them."""
    r = counts.shape[1]
    if len(tp_image) == 0:
        return np.zeros((r, len(REC_THRS)))
    # (positions, resamples): gathering rows of the transposed counts and summing down columns keeps
    # every pass contiguous
    tp_sum = np.cumsum(counts[tp_image], axis=0).astype(np.float64)  # integer-valued: the float32 sums are exact
    fp_cum = np.zeros((len(fp_image) + 1, r), dtype=np.float32)
    np.cumsum(counts[fp_image], axis=0, out=fp_cum[1:])
    fp_sum = fp_cum[fp_before].astype(np.float64)
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1], axis=0)[::-1]  # the envelope, from the end
    recall = np.ascontiguousarray((tp_sum / np.maximum(npig, 1e-12)).T)
    # the first true positive whose recall reaches each threshold, compared as pycocotools does (in float)
    first = np.stack([np.searchsorted(row, REC_THRS, side="left") for row in recall])  # (r, 101)
    picked = np.take_along_axis(precision.T, np.minimum(first, len(tp_image) - 1), axis=1)
    return np.where(first < len(tp_image), picked, 0.0)


def bootstrap(
    matches: dict[str, Matches],
    pairs: list[tuple[str, str]] = (),
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Point AP and percentile interval of every model, and of the paired differences `pairs`
    (a - b on the same resamples), over `resamples` draws of the images with replacement."""
    t0 = time.perf_counter()
    ids = next(iter(matches.values())).image_ids
    if any(m.image_ids != ids for m in matches.values()):
        raise ValueError("bootstrap: every model must be matched on the same images")
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)) for _ in range(resamples)])
    counts = counts.astype(np.float64)
    samples = {name: average_precision(m, counts) for name, m in matches.items()}
    point = {name: float(average_precision(m)[0]) for name, m in matches.items()}
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def summary(value: float, draws: np.ndarray) -> dict[str, float]:
        return {"AP": value, "low": float(np.percentile(draws, lo)), "high": float(np.percentile(draws, hi))}

    return {
        "models": {name: summary(point[name], samples[name]) for name in matches},
        "differences": {f"{a} - {b}": summary(point[a] - point[b], samples[a] - samples[b]) for a, b in pairs},
        "images": len(ids),
        "resamples": resamples,
        "level": level,
        "seconds": time.perf_counter() - t0,
    }
