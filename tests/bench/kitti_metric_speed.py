"""Time of KITTI's metric (evaluation/kitti.py) at the size of KITTI's validation split: random scenes
of the devkit's mix (cars, pedestrians, cyclists, vans, DontCare) with 100 detections per image, a
third of them near an object. Prints seconds for the whole split next to pycocotools' COCO AP on
the same detections (the figure every evaluation epoch already pays).

    python tests/bench/kitti_metric_speed.py --images 3769
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clockdistill.evaluation.coco import coco_evaluate
from clockdistill.evaluation.kitti import kitti_evaluate

TYPES = ("Car", "Car", "Car", "Pedestrian", "Cyclist", "Van", "DontCare")


def scene(n_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(("Car", "Pedestrian", "Cyclist"))]
    images, anns, results = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": 1242, "height": 375})
        boxes = []
        for _ in range(rng.integers(1, 12)):
            kind = TYPES[rng.integers(len(TYPES))]
            w, h = rng.uniform(20, 200), rng.uniform(15, 150)
            box = [rng.uniform(0, 1242 - w), rng.uniform(0, 375 - h), w, h]
            boxes.append(box)
            fields = {
                "type": kind,
                "truncated": float(rng.choice([0, 0.1, 0.3, 0.6])),
                "occluded": int(rng.integers(0, 3)),
            }
            cat = {"Pedestrian": 2, "Cyclist": 3}.get(kind, 1)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box, "area": w * h,
                         "iscrowd": int(kind in ("Van", "DontCare")), "kitti": fields})  # fmt: skip
        for k in range(dets_per_image):
            if k < dets_per_image // 3:
                b = boxes[k % len(boxes)]
                box = [
                    b[0] + rng.normal(0, 5),
                    b[1] + rng.normal(0, 5),
                    b[2] * rng.uniform(0.9, 1.1),
                    b[3] * rng.uniform(0.9, 1.1),
                ]
            else:
                w, h = rng.uniform(10, 200), rng.uniform(10, 150)
                box = [rng.uniform(0, 1242 - w), rng.uniform(0, 375 - h), w, h]
            results.append(
                {"image_id": i, "category_id": int(rng.integers(1, 4)), "bbox": box, "score": float(rng.uniform())}
            )
    return {"images": images, "annotations": anns, "categories": cats}, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3769)
    p.add_argument("--dets", type=int, default=100)
    args = p.parse_args()
    dataset, results = scene(args.images, args.dets)
    t0 = time.perf_counter()
    kitti = kitti_evaluate(dataset, results)
    t1 = time.perf_counter()
    coco = coco_evaluate(dataset, results)
    t2 = time.perf_counter()
    print(f"{args.images} images, {len(results)} detections, {len(dataset['annotations'])} labels")
    print(
        f"KITTI metric (9 class x difficulty curves): {t1 - t0:.1f} s  "
        f"Car moderate AP|R40 {kitti['kitti/Car/moderate']:.4f}"
    )
    print(f"COCO AP (pycocotools):                     {t2 - t1:.1f} s  AP {coco['AP']:.4f}")
    print(f"ratio KITTI / COCO: {(t1 - t0) / (t2 - t1):.2f}")


if __name__ == "__main__":
    main()
