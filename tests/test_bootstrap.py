"""Bootstrap intervals of COCO AP over images (clockdistill/evaluation/bootstrap.py)."""

import numpy as np
import pytest

from clockdistill.evaluation.bootstrap import average_precision, bootstrap, match_images
from clockdistill.evaluation.coco import coco_evaluate


def _ground_truth(images: int, boxes_per_image, rng, crowd: float = 0.0) -> dict:
    imgs = [{"id": i + 1, "file_name": f"{i}.png", "width": 200, "height": 160} for i in range(images)]
    anns = []
    for img in imgs:
        for _ in range(boxes_per_image(rng)):
            w, h = rng.uniform(8, 90, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 160 - h)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.integers(1, 4)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < crowd)})  # fmt: skip
    return {"images": imgs, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


def _detector(gt: dict, rng, found: float = 0.8, jitter: float = 0.12, false_per_image: int = 3) -> list[dict]:
    out = []
    for a in gt["annotations"]:
        if rng.random() < found:
            x, y, w, h = a["bbox"]
            j = rng.normal(0, jitter, 4) * [w, h, w, h]
            label = a["category_id"] if rng.random() < 0.9 else 1 + a["category_id"] % 3
            out.append({"image_id": a["image_id"], "category_id": label, "score": float(rng.random()),
                        "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})  # fmt: skip
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, false_per_image + 1))):
            out.append({"image_id": img["id"], "category_id": int(rng.integers(1, 4)), "score": float(rng.random()),
                        "bbox": [*rng.uniform(0, 150, 2).tolist(), 30.0, 25.0]})  # fmt: skip
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_per_image_path_gives_pycocotools_ap(seed):
    """Every count 1 is pycocotools' own AP, AP50 and AP75: crowd regions, empty images, wrong labels,
    more than 100 detections on some images."""
    rng = np.random.default_rng(seed)
    gt = _ground_truth(40, lambda r: int(r.integers(0, 6)), rng, crowd=0.1)
    results = _detector(gt, rng)
    results += [{"image_id": 1, "category_id": 1, "score": float(s), "bbox": [5.0, 5.0, 10.0, 10.0]}
                for s in rng.random(120)]  # fmt: skip
    ids = [i["id"] for i in gt["images"]]
    reference = coco_evaluate(gt, results, ids)
    matches = match_images(gt, results, ids)
    for key, iou in (("AP", None), ("AP50", 0), ("AP75", 5)):
        assert average_precision(matches, iou=iou)[0] == pytest.approx(reference[key], abs=1e-6)
    assert average_precision(match_images(gt, [], ids))[0] == 0.0  # a model that detects nothing


def test_a_hand_built_case_whose_ap_is_known_is_inside_its_interval():
    """60 images, one box each: the first 30 found exactly at scores above every false detection on
    the other 30. Recall reaches 1/2 at precision 1 and then only false positives follow, so AP is
    51/101 (recall thresholds 0, 0.01, ..., 0.50); a resample's AP moves with its share of found images."""
    gt = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(60)],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [10.0, 10.0, 40.0, 40.0],
                "area": 1600.0,
                "iscrowd": 0,
            }
            for i in range(60)
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "thing"}],
    }
    found = [{"image_id": i + 1, "category_id": 1, "score": 0.9, "bbox": [10.0, 10.0, 40.0, 40.0]} for i in range(30)]
    missed = [{"image_id": i + 1, "category_id": 1, "score": 0.5, "bbox": [60.0, 60.0, 30.0, 30.0]}
              for i in range(30, 60)]  # fmt: skip
    matches = {"model": match_images(gt, found + missed, list(range(1, 61)))}
    report = bootstrap(matches, resamples=500, seed=3)
    ap = report["models"]["model"]
    assert ap["AP"] == pytest.approx(51 / 101, abs=1e-12)
    assert ap["low"] < 51 / 101 < ap["high"] and ap["high"] - ap["low"] > 0.1  # 30 of 60 found: a wide interval
    assert bootstrap(matches, resamples=500, seed=3)["models"] == report["models"]  # the seed fixes the draws


def test_paired_differences_use_the_same_resamples():
    rng = np.random.default_rng(5)
    gt = _ground_truth(80, lambda r: int(r.integers(1, 5)), rng)
    ids = [i["id"] for i in gt["images"]]
    good = match_images(gt, _detector(gt, rng, found=0.9, jitter=0.05), ids)
    poor = match_images(gt, _detector(gt, rng, found=0.5, jitter=0.2), ids)
    report = bootstrap({"good": good, "same": good, "poor": poor}, pairs=[("good", "same"), ("good", "poor")])
    assert report["differences"]["good - same"] == {"AP": 0.0, "low": 0.0, "high": 0.0}
    diff = report["differences"]["good - poor"]
    assert diff["AP"] == pytest.approx(report["models"]["good"]["AP"] - report["models"]["poor"]["AP"])
    assert 0 < diff["low"] < diff["AP"] < diff["high"]
    with pytest.raises(ValueError, match="same images"):
        bootstrap({"a": good, "b": match_images(gt, [], ids[:10])})


def test_the_gain_sentence_claims_no_more_than_its_interval():
    from sweeps.results.held_out import gain_sentence

    def said(ap, low, high):
        return gain_sentence({"differences": {"winner - alone": {"AP": ap, "low": low, "high": high}}})

    assert said(0.021, 0.004, 0.038).startswith("distillation gained +2.10 AP [+0.40, +3.80]")
    assert said(-0.02, -0.03, -0.01).startswith("distillation lost -2.00 AP")
    assert "the interval spans 0, no gain shown" in said(0.01, -0.002, 0.02)
    assert "not measured" in gain_sentence({"differences": {}})
