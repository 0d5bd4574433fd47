"""KITTI's own 2-D metric (clockdistill/evaluation/kitti.py) against cases computed by hand from the
object devkit's rules: difficulties (height > 40 / 25 / 25 px, occlusion, truncation), neighbouring
classes and DontCare regions that make no false positive, the 41 thresholds and AP|R40 / AP|R11."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clockdistill.errors import DataError
from clockdistill.evaluation.kitti import kitti_evaluate, thresholds_for, write_kitti_results
from clockdistill.metrics import kitti_metric

CATS = [{"id": 1, "name": "Car"}, {"id": 2, "name": "Pedestrian"}, {"id": 3, "name": "Cyclist"}]
CAR = [100.0, 100.0, 80.0, 50.0]  # x, y, w, h: 50 px high, easy when untruncated and unoccluded


class Scene:
    """A data set of images, each given its objects and detections."""

    def __init__(self):
        self.images, self.annotations, self.results = [], [], []

    def image(self, objects=(), detections=()) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": f"{image_id - 1:06d}.png", "width": 1242, "height": 375})
        for kind, box, truncated, occluded in objects:
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": int(kind not in ("Car", "Pedestrian", "Cyclist")),
                    "kitti": {"type": kind, "truncated": truncated, "occluded": occluded},
                }
            )
        for name, box, score in detections:
            cat = next(c["id"] for c in CATS if c["name"] == name)
            self.results.append({"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score})
        return image_id

    def dataset(self) -> dict:
        return {"images": self.images, "annotations": self.annotations, "categories": CATS}

    def evaluate(self) -> dict[str, float]:
        return kitti_evaluate(self.dataset(), self.results)


def cars(scene: Scene, n: int, box=CAR, truncated=0.0, occluded=0, detected=True, start=0.9):
    """n images with one Car each, detected exactly with decreasing scores."""
    for i in range(n):
        dets = [("Car", box, start - i * 1e-3)] if detected else []
        scene.image([("Car", box, truncated, occluded)], dets)


R40, R11 = (lambda d: kitti_metric("Car", d)), (lambda d: kitti_metric("Car", d, r11=True))


def test_a_perfect_detector_scores_1_given_enough_objects():
    scene = Scene()
    cars(scene, 50)
    stats = scene.evaluate()
    for d in ("easy", "moderate", "hard"):
        assert stats[R40(d)] == 1.0 and stats[R11(d)] == 1.0
    assert stats[kitti_metric(None, "moderate")] == pytest.approx(1 / 3)  # no Pedestrian, no Cyclist: 0 each
    assert stats[kitti_metric("Pedestrian", "easy")] == 0.0


def test_what_the_devkit_does_with_few_objects():
    """The precision array is indexed by threshold: fewer than 41 thresholds leave recall points at 0.
    One perfectly found object: AP|R40 0, AP|R11 1/11; forty: AP|R40 39/40."""
    one = Scene()
    cars(one, 1)
    assert one.evaluate()[R40("moderate")] == 0.0
    assert one.evaluate()[R11("moderate")] == pytest.approx(1 / 11)
    forty = Scene()
    cars(forty, 40)
    assert forty.evaluate()[R40("moderate")] == pytest.approx(39 / 40)
    assert len(thresholds_for([1 - i / 100 for i in range(40)], 40)) == 40
    assert len(thresholds_for([1 - i / 100 for i in range(41)], 41)) == 41


def test_one_false_positive_at_the_top_score():
    """40 cars found with scores 0.9 ... 0.861 and one Car detection on empty road at 0.99: at the i-th
    threshold precision (i+1)/(i+2), its suffix max 40/41 at the 40 thresholds, 0 at the 41st;
    AP|R40 = 39 x 40/41 / 40 = 39/41, AP|R11 = 10 x 40/41 / 11."""
    scene = Scene()
    cars(scene, 40)
    scene.image([], [("Car", [600.0, 100.0, 80.0, 50.0], 0.99)])
    stats = scene.evaluate()
    assert stats[R40("moderate")] == pytest.approx(39 / 41)
    assert stats[R11("moderate")] == pytest.approx(10 * 40 / 41 / 11)


def test_difficulty_follows_height_truncation_and_occlusion():
    """Boxes the devkit leaves out of a difficulty are neither found nor missed there."""
    scene = Scene()
    cars(scene, 50)
    # missed: a car just at the moderate height (25 px: the devkit keeps heights > 25) is in no difficulty
    scene.image([("Car", [10.0, 10.0, 40.0, 25.0], 0.0, 0)])
    assert all(scene.evaluate()[R40(d)] == 1.0 for d in ("easy", "moderate", "hard"))
    # missed: a car of 26 px counts for moderate and hard, not easy
    scene.image([("Car", [10.0, 10.0, 40.0, 26.0], 0.0, 0)])
    stats = scene.evaluate()
    assert stats[R40("easy")] == 1.0 and stats[R40("moderate")] < 1.0 and stats[R40("hard")] < 1.0
    # missed: a truncated car (0.2: over easy's 0.15), and a partly occluded one
    trunc, occl = Scene(), Scene()
    cars(trunc, 50)
    trunc.image([("Car", CAR, 0.2, 0)])
    cars(occl, 50)
    occl.image([("Car", CAR, 0.0, 1)])
    for s in (trunc, occl):
        stats = s.evaluate()
        assert stats[R40("easy")] == 1.0 and stats[R40("moderate")] < 1.0


def test_neighbouring_classes_and_dontcare_make_no_false_positive():
    def with_extra(objects, det_box) -> float:
        scene = Scene()
        cars(scene, 50)
        scene.image(objects, [("Car", det_box, 0.99)])
        return scene.evaluate()[R40("moderate")]

    far = [900.0, 100.0, 80.0, 50.0]
    assert with_extra([("Van", far, 0.0, 0)], far) == 1.0  # a Car detection on a Van: ignored
    assert with_extra([("Truck", far, 0.0, 0)], far) < 1.0  # on a Truck: a false positive
    assert with_extra([("DontCare", [880.0, 90.0, 120.0, 70.0], -1.0, -1)], far) == 1.0  # inside DontCare
    assert with_extra([("DontCare", [950.0, 90.0, 120.0, 70.0], -1.0, -1)], far) < 1.0  # only 30/80 of it inside
    assert with_extra([], [900.0, 100.0, 80.0, 20.0]) == 1.0  # a detection under the minimum height: ignored
    assert with_extra([], far) < 1.0  # the same at full height: a false positive


def test_iou_threshold_is_per_class():
    """Car needs IoU > 0.7, Pedestrian > 0.5: a box shifted to IoU 0.6 is a hit for one, a miss for the other."""
    shifted = [100.0 + 80.0 * 0.25, 100.0, 80.0, 50.0]  # overlap 60/100 of the width: IoU 60/100 = 0.6
    for cls, expected in (("Car", 0.0), ("Pedestrian", 1.0)):
        scene = Scene()
        for i in range(50):
            scene.image([(cls, CAR, 0.0, 0)], [(cls, shifted, 0.9 - i * 1e-3)])
        assert scene.evaluate()[kitti_metric(cls, "moderate")] == expected


def test_data_without_kitti_fields_is_refused():
    scene = Scene()
    cars(scene, 2)
    for a in scene.annotations:
        del a["kitti"]
    with pytest.raises(DataError, match="no KITTI fields.*clockdistill data kitti"):
        scene.evaluate()


def test_result_files_score_the_same_when_read_back(tmp_path):
    """One .txt per image in KITTI's result format; read back as the devkit does, the same AP."""
    scene = Scene()
    cars(scene, 45)
    scene.image([("Car", CAR, 0.0, 0)], [])  # an image without detections gets an empty file
    scene.image([], [("Pedestrian", [600.0, 100.0, 30.0, 70.0], 0.5)])
    assert write_kitti_results(scene.dataset(), scene.results, tmp_path) == 47
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["000000.txt", "000001.txt"]
    assert (tmp_path / "000045.txt").read_text() == ""
    back = []
    for im in scene.images:
        for line in (tmp_path / im["file_name"].replace(".png", ".txt")).read_text().splitlines():
            f = line.split()
            assert len(f) == 16 and f[3] == "-10"
            x1, y1, x2, y2 = map(float, f[4:8])
            cat = next(c["id"] for c in CATS if c["name"] == f[0])
            back.append(
                {"image_id": im["id"], "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(f[15])}
            )
    assert kitti_evaluate(scene.dataset(), back) == pytest.approx(scene.evaluate())


def _random_detector(out, class_names):
    import torch

    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.config.layers import resolve_config
    from clockdistill.models.build import build_detector

    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student"}, "data": {"max_size": 128}})
    model = build_detector(cfg.model, len(class_names))
    save_checkpoint(out, model, {"config": cfg.to_dict(), "class_names": class_names})
    return out


def test_converted_kitti_data_carries_the_fields_and_evaluate_prints_the_table(tmp_path):
    """`data kitti` writes each label's raw type, truncation and occlusion (DontCare and Van too);
    `clockdistill evaluate` on such data reports the KITTI figures and writes result files."""
    from test_data import make_kitti

    from clockdistill.data.kitti import convert_kitti

    kitti = make_kitti(tmp_path / "kitti")
    convert_kitti(kitti, tmp_path / "coco", kitti / "train.txt", kitti / "val.txt")
    doc = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    types = [a["kitti"]["type"] for a in doc["annotations"]]
    assert types == ["Car", "Pedestrian", "DontCare", "Van", "Cyclist"]
    assert doc["annotations"][4]["kitti"] == {"type": "Cyclist", "truncated": 0.0, "occluded": 1}
    out = tmp_path / "results"
    checkpoint = _random_detector(tmp_path / "ckpt", [c["name"] for c in doc["categories"]])
    run = subprocess.run(
        [sys.executable, "-m", "clockdistill", "evaluate", "--checkpoint", str(checkpoint), "--data",
         str(tmp_path / "coco"), "--split", "train", "--quiet", "--kitti-results", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    metrics = json.loads(run.stdout)
    assert 0.0 <= metrics["kitti/Car/moderate"] <= 1.0 and "kitti/mean/hard" in metrics and "AP" in metrics
    assert "AP|R40 (AP|R11)" in run.stderr and "Pedestrian" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000000.txt", "000001.txt"]


def test_held_out_figures_on_kitti_data_carry_kittis_metric(tmp_path):
    """best-student's held-out report on converted KITTI data gives each model KITTI's own figures on the
    test split, the values `clockdistill evaluate --split test` reports, and prints them."""
    import shutil

    import torch
    from test_data import make_kitti

    from clockdistill.data.kitti import convert_kitti
    from sweeps.results.held_out import ALONE, TEACHER, WINNER, Contender, held_out_report, table

    kitti = make_kitti(tmp_path / "kitti")
    coco = tmp_path / "coco"
    convert_kitti(kitti, coco, kitti / "train.txt", kitti / "val.txt")
    shutil.copy(coco / "annotations" / "instances_train.json", coco / "annotations" / "instances_test.json")
    shutil.copytree(coco / "images" / "train", coco / "images" / "test", dirs_exist_ok=True)
    doc = json.loads((coco / "annotations" / "instances_test.json").read_text())
    checkpoint = _random_detector(tmp_path / "ckpt", [c["name"] for c in doc["categories"]])
    contenders = [Contender(k, k, checkpoint, None) for k in (TEACHER, ALONE, WINNER)]
    report = held_out_report(contenders, coco, torch.device("cpu"), resamples=20)
    run = subprocess.run(
        [sys.executable, "-m", "clockdistill", "evaluate", "--checkpoint", str(checkpoint), "--data", str(coco),
         "--split", "test", "--quiet", "--device", "cpu"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    evaluated = json.loads(run.stdout)
    for key in (TEACHER, ALONE, WINNER):
        figures = report["models"][key]["kitti"]
        assert set(figures) == {k for k in evaluated if k.startswith("kitti/")}
        assert all(figures[k] == pytest.approx(evaluated[k], abs=1e-9) for k in figures)
    assert "KITTI AP|R40, mean of classes (test)" in table(report)
