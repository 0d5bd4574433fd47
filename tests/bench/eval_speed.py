"""Benchmark: COCO bbox evaluation with pycocotools (what clockdistill uses) against faster-coco-eval,
on generated ground truth and detections (default 5,000 images x 100 detections), with the agreement
of every summary statistic. faster-coco-eval is a reference only; it is installed when missing.

    python tests/bench/eval_speed.py [--images 5000] [--dets 100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time

import numpy as np


def generate(n_images: int, dets_per_image: int, n_classes: int = 20, seed: int = 0) -> tuple[dict, list[dict]]:
    """COCO-like ground truth (1-12 boxes an image, small to large) and detections: jittered copies
    of the ground truth with high scores plus random boxes with low scores, `dets_per_image` each."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        w, h = 640, 480
        images.append({"id": i, "width": w, "height": h, "file_name": f"{i:06d}.jpg"})
        n = int(rng.integers(1, 13))
        sizes = rng.choice([16, 48, 160], n) * rng.uniform(0.6, 1.4, n)
        for k in range(n):
            bw, bh = sizes[k], sizes[k] * rng.uniform(0.5, 2.0)
            x, y = rng.uniform(0, w - min(bw, w - 1)), rng.uniform(0, h - min(bh, h - 1))
            bw, bh = min(bw, w - x), min(bh, h - y)
            cat = int(rng.integers(1, n_classes + 1))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            if len(dets) < i * dets_per_image and rng.random() < 0.85:
                jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                dets.append(
                    {
                        "image_id": i,
                        "category_id": cat if rng.random() < 0.9 else int(rng.integers(1, n_classes + 1)),
                        "bbox": [x + jitter[0], y + jitter[1], max(1.0, bw + jitter[2]), max(1.0, bh + jitter[3])],
                        "score": float(rng.uniform(0.4, 1.0)),
                    }
                )
        while len(dets) < i * dets_per_image:
            bw, bh = rng.uniform(8, 200, 2)
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, n_classes + 1)),
                    "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                    "score": float(rng.uniform(0.0, 0.5)),
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_classes + 1)],
    }
    return gt, dets


def evaluate(module: str, gt: dict, dets: list[dict]) -> tuple[np.ndarray, float]:
    if module == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Eval
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        result = coco.loadRes([dict(d) for d in dets])
        ev = Eval(coco, result, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        elapsed = time.perf_counter() - t0
    return np.asarray(ev.stats[:12], dtype=np.float64), elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "faster-coco-eval"], check=True)
    t0 = time.perf_counter()
    gt, dets = generate(args.images, args.dets)
    print(
        f"generated {len(gt['images'])} images, {len(gt['annotations'])} boxes, {len(dets)} detections "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    times: dict[str, list[float]] = {"pycocotools": [], "faster_coco_eval": []}
    stats = {}
    for _ in range(args.repeats):
        for module in times:  # interleaved: both see the same machine load
            stats[module], elapsed = evaluate(module, gt, dets)
            times[module].append(elapsed)
    ref, fast = (min(times[m]) for m in times)
    diff = float(np.abs(stats["pycocotools"] - stats["faster_coco_eval"]).max())
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    print("  ".join(f"{n} {v:.4f}" for n, v in zip(names, stats["pycocotools"])))
    print(f"pycocotools      {ref:7.2f} s")
    print(f"faster-coco-eval {fast:7.2f} s   speed-up {ref / fast:.2f}x")
    print(
        f"largest |difference| over the 12 summary statistics: {diff:.2e} ({'agree' if diff <= 1e-6 else 'DIFFER'} at "
        "1e-6)"
    )


if __name__ == "__main__":
    main()
