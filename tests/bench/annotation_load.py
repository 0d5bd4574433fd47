"""Benchmark: loading annotations through the Parquet index against pycocotools on the COCO JSON.

    python tests/bench/annotation_load.py [--images 118287] [--boxes 860001] [--workdir DIR] [--repeats 3]

Generates a COCO-scale annotation file (COCO train2017 has 118,287 images and 860,001 boxes, 80
classes), builds its Parquet index once (timed on its own: it happens once per annotation file),
then times what every trial of a sweep pays to get the annotations: `load_index` (hash check +
Parquet read) against `pycocotools.coco.COCO(json)` (JSON parse + index). Prints the ratio.
Target (issue 7): the index at least 10x faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_coco_scale(path: Path, n_images: int, n_boxes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_image = rng.multinomial(n_boxes, np.full(n_images, 1.0 / n_images))
    widths = rng.integers(320, 641, n_images)
    heights = rng.integers(240, 481, n_images)
    images = [
        {"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": int(w), "height": int(h)}
        for i, (w, h) in enumerate(zip(widths, heights))
    ]
    img_of_box = np.repeat(np.arange(n_images), per_image)
    bw = rng.uniform(4, 200, n_boxes)
    bh = rng.uniform(4, 200, n_boxes)
    x = rng.uniform(0, 1, n_boxes) * np.maximum(widths[img_of_box] - bw, 1)
    y = rng.uniform(0, 1, n_boxes) * np.maximum(heights[img_of_box] - bh, 1)
    cats = rng.integers(1, 81, n_boxes)
    annotations = [
        {
            "id": k + 1,
            "image_id": int(img_of_box[k]) + 1,
            "category_id": int(cats[k]),
            "bbox": [round(float(x[k]), 2), round(float(y[k]), 2), round(float(bw[k]), 2), round(float(bh[k]), 2)],
            "area": round(float(bw[k] * bh[k]), 2),
            "iscrowd": 0,
        }
        for k in range(n_boxes)
    ]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    (path.parents[1] / "images" / "train").mkdir(parents=True, exist_ok=True)  # the layout; no image files needed here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=118287)
    ap.add_argument("--boxes", type=int, default=860001)
    ap.add_argument("--workdir", default=None, help="keep the generated data set here (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from pycocotools.coco import COCO

    from clockdistill.data.index import build_index, load_index

    root = Path(args.workdir or tempfile.mkdtemp(prefix="ann-bench-"))
    ann = root / "annotations" / "instances_train.json"
    if not ann.is_file():
        t0 = time.perf_counter()
        write_coco_scale(ann, args.images, args.boxes)
        print(f"# wrote {ann} ({ann.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    build_index(root, "train", check_images=False)
    print(f"# index built (or found) in {time.perf_counter() - t0:.1f}s; once per annotation file")

    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        index = load_index(root, "train")
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann))
        theirs.append(time.perf_counter() - t0)
    assert len(index) == len(coco.imgs) and len(index.boxes) == len(coco.anns)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"{'loader':<34} {'median s':>9}")
    print(f"{'Parquet index (load_index)':<34} {o:>9.3f}")
    print(f"{'pycocotools COCO(json)':<34} {t:>9.3f}")
    print(f"index speed-up: {t / o:.1f}x ({len(index)} images, {len(index.boxes)} boxes, median of {args.repeats})")


if __name__ == "__main__":
    main()
