"""How long the bootstrap of best-student takes: per-image matching once, then N resamples.

    python tests/bench/bootstrap_speed.py [--images 300 5000] [--resamples 1000] [--classes 4]

Builds a ground truth of synthetic boxes (no image files: the bootstrap never reads pixels) and two
models' detections near it (a noisy copy with false positives), and prints, per image count: the
matching time (pycocotools' evaluate, once per model), the time of the resamples for both models
and their paired difference, and the point AP against pycocotools' own evaluation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clockdistill.evaluation.bootstrap import bootstrap, match_images
from clockdistill.evaluation.coco import coco_evaluate


def ground_truth(images: int, classes: int, rng: np.random.Generator) -> dict:
    imgs = [{"id": i + 1, "file_name": f"{i}.png", "width": 640, "height": 480} for i in range(images)]
    anns = []
    for img in imgs:
        for _ in range(int(rng.integers(0, 8))):
            w, h = rng.uniform(10, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.integers(1, classes + 1)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    return {"images": imgs, "annotations": anns, "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(classes)]}


def detections(gt: dict, rng: np.random.Generator, noise: float, extra: int) -> list[dict]:
    """A detector's output: most boxes found with jitter, some labels wrong, `extra` false ones per image."""
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.85:
            x, y, w, h = a["bbox"]
            j = rng.normal(0, noise, 4) * [w, h, w, h]
            out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                        "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})  # fmt: skip
    classes = len(gt["categories"])
    for img in gt["images"]:
        for _ in range(extra):
            out.append({"image_id": img["id"], "category_id": int(rng.integers(1, classes + 1)),
                        "score": float(rng.random() * 0.6), "bbox": [*rng.uniform(0, 400, 2), 50.0, 50.0]})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[300, 5000])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    for n in args.images:
        rng = np.random.default_rng(0)
        gt = ground_truth(n, args.classes, rng)
        ids = [i["id"] for i in gt["images"]]
        runs = {"a": detections(gt, rng, 0.08, 10), "b": detections(gt, rng, 0.15, 20)}
        t0 = time.perf_counter()
        matches = {name: match_images(gt, res, ids) for name, res in runs.items()}
        t1 = time.perf_counter()
        report = bootstrap(matches, pairs=[("a", "b")], resamples=args.resamples)
        t2 = time.perf_counter()
        reference = coco_evaluate(gt, runs["a"], ids)["AP"]
        a, d = report["models"]["a"], report["differences"]["a - b"]
        print(
            f"{n} images, {sum(len(r) for r in runs.values())} detections, {args.classes} classes: matching "
            f"{t1 - t0:.1f} s (2 models), {args.resamples} resamples {t2 - t1:.1f} s; AP a {a['AP']:.4f} "
            f"[{a['low']:.4f}, {a['high']:.4f}] (pycocotools {reference:.4f}, |diff| {abs(a['AP'] - reference):.1e}); "
            f"a - b {d['AP']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        )


if __name__ == "__main__":
    main()
