import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from clockdistill.data.coco import parse_coco
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.index import build_index, load_index
from clockdistill.data.kitti import convert_kitti
from clockdistill.data.synth import CLASSES, write_synthetic
from clockdistill.data.transforms import DetectionTransform
from clockdistill.errors import DataError
from conftest import write_coco


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".index" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = write_synthetic(tmp_path / "a", 6, 3, seed=5, progress=False)
    b = write_synthetic(tmp_path / "b", 6, 3, seed=5, progress=False)
    c = write_synthetic(tmp_path / "c", 6, 3, seed=6, progress=False)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_synthetic_content(synth_data):
    doc = json.loads((synth_data / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in doc["categories"]] == list(CLASSES)
    assert len(doc["images"]) == 24 and all(
        (synth_data / "images" / "train" / i["file_name"]).is_file() for i in doc["images"]
    )
    per_image = {i["id"]: 0 for i in doc["images"]}
    for a in doc["annotations"]:
        per_image[a["image_id"]] += 1
    # a larger set shows the promised variety: empty images, small and large objects, every class
    big = write_synthetic(synth_data.parent / "variety", 150, 0, seed=1, progress=False)
    doc = json.loads((big / "annotations" / "instances_train.json").read_text())
    counts = np.bincount([a["image_id"] for a in doc["annotations"]], minlength=151)[1:]
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in doc["annotations"]])
    assert (counts == 0).sum() >= 3
    assert (areas < 32**2).sum() > 0 and (areas > 96**2).sum() > 0
    assert {a["category_id"] for a in doc["annotations"]} == {1, 2, 3, 4}


def test_index_round_trip_and_reuse(synth_data):
    ann = json.loads((synth_data / "annotations" / "instances_val.json").read_text())
    path = build_index(synth_data, "val")
    assert build_index(synth_data, "val") == path  # reused, not rebuilt
    idx = load_index(synth_data, "val")
    assert idx.image_ids.tolist() == [i["id"] for i in ann["images"]]
    assert idx.file_names == [i["file_name"] for i in ann["images"]]
    assert [c["name"] for c in idx.categories] == list(CLASSES)
    for row, img in enumerate(ann["images"]):
        boxes, cats, crowd = idx.annotations(row)
        want = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
        assert len(boxes) == len(want)
        for box, cat, a in zip(boxes, cats, want):
            x, y, w, h = a["bbox"]
            assert np.allclose(box, [x, y, x + w, y + h], atol=1e-3) and cat == a["category_id"]
        assert not crowd.any()


def test_index_rebuilt_when_annotations_change(tmp_path):
    img = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    write_coco(tmp_path, "train", img, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}])
    first = build_index(tmp_path, "train")
    write_coco(tmp_path, "train", img, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}])
    second = build_index(tmp_path, "train")
    assert first != second
    assert load_index(tmp_path, "train").boxes[0].tolist() == [5, 5, 15, 15]


def test_dataset_targets_normalised_cxcywh_and_crowd_excluded(tmp_path):
    img = [{"id": 3, "file_name": "a.png", "width": 200, "height": 100}]
    anns = [
        {"id": 1, "image_id": 3, "category_id": 9, "bbox": [20, 10, 40, 20]},
        {"id": 2, "image_id": 3, "category_id": 9, "bbox": [100, 50, 20, 20], "iscrowd": 1},
    ]
    write_coco(tmp_path, "val", img, anns, categories=[{"id": 9, "name": "x"}])
    ds = CocoDetection(tmp_path, "val", DetectionTransform(64, train=False))
    image, target = ds[0]
    assert image.shape == (3, 32, 64)
    assert target["boxes"][0].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2]) and len(target["boxes"]) == 1
    assert target["labels"].tolist() == [0] and ds.label_to_cat == [9]
    assert target["orig_size"].tolist() == [100, 200]


def test_flip_mirrors_boxes(synth_data):
    import random

    tf = DetectionTransform(128, train=True, hflip=1.0)
    ds = CocoDetection(synth_data, "train", DetectionTransform(128, train=False))
    i = next(k for k in range(len(ds)) if len(ds[k][1]["labels"]))
    image, target = ds[i]
    flipped, ft = tf(ds.load_image(i), {**target}, random.Random(0))
    assert np.allclose(ft["boxes"][:, 0], 1 - target["boxes"][:, 0])
    assert np.allclose(flipped.flip(-1), image, atol=1e-5)


def test_the_square_recipe_stretches_images_and_scales_each_training_batch(tmp_path):
    """data.resize square (RT-DETR's and D-FINE's recipe, their presets' default): a 200 x 100 image
    becomes 64 x 64 with its relative boxes unchanged and no padding; a training batch is interpolated
    to its first sample's drawn size; the decoded cache keeps square images in their own file; the
    detection of the whole image maps back to the original image's box."""
    from clockdistill.config.layers import resolve_config
    from clockdistill.data.transforms import collate
    from clockdistill.evaluation.coco import postprocess

    img = [{"id": 3, "file_name": "a.png", "width": 200, "height": 100}]
    write_coco(tmp_path, "val", img, [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [20, 10, 40, 20]}])
    data = resolve_config({"model": {"preset": "rtdetr-tiny-student"}, "data": {"max_size": 64}}).data
    assert data.resize == "square" and data.canvas == (64, 64)
    ds = CocoDetection(tmp_path, "val", DetectionTransform.for_data(data, train=False))
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["boxes"][0].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2])
    images, mask, targets = collate([ds[0], ds[0]])
    assert images.shape == (2, 3, 64, 64) and not mask.any()
    out = {"pred_logits": torch.full((1, 1, 1), 5.0), "pred_boxes": target["boxes"][None, :1]}
    assert postprocess(out, target["orig_size"][None])[0]["boxes"][0].tolist() == pytest.approx([20, 10, 60, 30])
    train = CocoDetection(tmp_path, "val", DetectionTransform(64, True, [32, 48], hflip=0.5, square=True))
    scales = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        images, mask, targets = collate([train[0], train[0]])
        scales.add(images.shape[-1])
        assert images.shape[-2] == images.shape[-1] == targets[0]["batch_scale"] and not mask.any()
    assert scales == {32, 48}
    paths = [Path(p).name for p in ds.use_decoded_cache(str(tmp_path / "cache"), progress=False)]
    assert len(paths) == 1 and "-64-square-" in paths[0] and ds[0][0].shape == (3, 64, 64)


# --- bad input: one clear error naming the file or field -------------------------------------


def _img():
    return [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]


def test_corrupt_json(tmp_path):
    path = write_coco(tmp_path, "train", _img(), [])
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"instances_train.json: not valid JSON"):
        build_index(tmp_path, "train")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.pop("annotations"), r"'annotations': expected a list"),
        (lambda d: d["images"][0].update(width="40"), r"images\[0\]\.width: expected a positive integer"),
        (
            lambda d: d["annotations"].append({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}),
            r"annotations\[0\]\.bbox: expected \[x, y, width, height\]",
        ),
        (
            lambda d: d["annotations"].append({"id": 1, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]}),
            r"annotations\[0\]\.image_id",
        ),
        (
            lambda d: d["annotations"].append({"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4]}),
            r"annotations\[0\]\.category_id: unknown class 5",
        ),
    ],
)
def test_schema_violations(tmp_path, mutate, match):
    path = write_coco(tmp_path, "train", _img(), [])
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match):
        parse_coco(path)


def test_missing_image(tmp_path):
    write_coco(tmp_path, "train", _img(), [], make_images=False)
    with pytest.raises(DataError, match=r"a\.png: missing image file"):
        build_index(tmp_path, "train")


def test_degenerate_boxes_are_skipped_and_counted(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, -2]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    path = write_coco(tmp_path, "train", _img(), anns)
    with caplog.at_level(logging.WARNING):
        coco = parse_coco(path)
    assert coco.skipped_degenerate == 2 and len(coco.images[0].boxes) == 1
    assert "skipped 2 degenerate boxes" in caplog.text


# --- KITTI ------------------------------------------------------------------------------------

KITTI_LABELS = {
    "000000": [
        "Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59",
        "Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 8.41 0.01",
        "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10",
    ],
    "000001": [
        "Van 0.00 0 1.75 0.00 192.37 402.31 374.00 2.00 1.80 4.30 -8.89 1.80 5.97 0.23",
        "Truck 0.00 0 -1.57 599.41 156.40 629.75 189.25 2.85 2.63 12.34 0.47 1.49 69.44 -1.56",
        "Cyclist 0.00 1 -2.07 380.11 177.31 423.26 242.18 1.72 0.57 1.73 -7.74 1.72 22.40 -2.39",
        "Car 0.00 0 1.85 387.63 181.54 387.63 204.12 1.67 1.87 3.69 -16.53 2.39 58.49 1.57",
    ],
    "000002": ["Person_sitting 0.00 0 -1.1 500.0 180.0 540.0 260.0 1.2 0.6 0.9 1.0 1.6 10.0 -1.0"],
}


def make_kitti(root):
    from PIL import Image

    (root / "training" / "label_2").mkdir(parents=True)
    (root / "training" / "image_2").mkdir(parents=True)
    for sid, lines in KITTI_LABELS.items():
        (root / "training" / "label_2" / f"{sid}.txt").write_text("\n".join(lines) + "\n")
        Image.new("RGB", (1242, 375)).save(root / "training" / "image_2" / f"{sid}.png")
    (root / "train.txt").write_text("000000\n000001\n")
    (root / "val.txt").write_text("000002\n")
    return root


def test_kitti_conversion(tmp_path):
    kitti = make_kitti(tmp_path / "kitti")
    counts = convert_kitti(kitti, tmp_path / "coco", kitti / "train.txt", kitti / "val.txt")
    assert counts == {"train": 2, "val": 1, "test": 0}  # the test split takes every second val id: none of one
    doc = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["Car", "Pedestrian", "Cyclist"]
    assert doc["images"][0] == {"id": 1, "file_name": "000000.png", "width": 1242, "height": 375}
    by_image = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append((a["category_id"], a["iscrowd"]))
    assert by_image[1] == [(1, 0), (2, 0), (1, 1)]  # Car, Pedestrian, DontCare as ignore region
    assert by_image[2] == [(1, 1), (3, 0)]  # Van ignored, Truck dropped, Cyclist kept, zero-width Car skipped
    car = doc["annotations"][0]["bbox"]
    assert car == pytest.approx([587.01, 173.33, 614.12 - 587.01, 200.12 - 173.33])
    val = json.loads((tmp_path / "coco" / "annotations" / "instances_val.json").read_text())
    assert [(a["category_id"], a["iscrowd"]) for a in val["annotations"]] == [(2, 1)]
    # the result is a loadable data set
    ds = CocoDetection(tmp_path / "coco", "train", DetectionTransform(128, train=False))
    assert len(ds) == 2 and ds[0][1]["labels"].tolist() == [0, 1]
    mapped = convert_kitti(kitti, tmp_path / "coco2", kitti / "train.txt", kitti / "val.txt", map_similar=True)
    assert mapped["val"] == 1
    val2 = json.loads((tmp_path / "coco2" / "annotations" / "instances_val.json").read_text())
    assert [(a["category_id"], a["iscrowd"]) for a in val2["annotations"]] == [(2, 0)]


def test_kitti_holds_out_a_test_split_no_sweep_reads(tmp_path):
    """--test-ids, else ImageSets/test.txt when labelled and disjoint from train and val (the devkit's
    own lists the unlabelled testing images, whose ids repeat the training ones), else every second
    val id; a test list that overlaps train or val is refused."""
    from clockdistill.data.kitti import kitti_splits

    labelled = [f"{i:06d}" for i in range(20)]
    default = kitti_splits(tmp_path, labelled)
    assert default["val"] == ["000000", "000010"] and default["test"] == ["000005", "000015"]
    assert set(default["train"]) == set(labelled) - {"000000", "000005", "000010", "000015"}
    sets = tmp_path / "ImageSets"
    sets.mkdir()
    (sets / "train.txt").write_text("\n".join(labelled[:10]))
    (sets / "val.txt").write_text("\n".join(labelled[10:16]))
    (sets / "test.txt").write_text("\n".join(labelled[:5]))  # ids of the training list: the devkit's testing images
    devkit = kitti_splits(tmp_path, labelled)
    assert devkit["test"] == labelled[11:16:2] and devkit["val"] == labelled[10:16:2]
    (sets / "test.txt").write_text("\n".join(labelled[16:]))  # labelled, in neither list: a real test split
    assert kitti_splits(tmp_path, labelled)["test"] == labelled[16:]
    (tmp_path / "mine.txt").write_text("000003\n000019\n")
    with pytest.raises(DataError, match=r"--test-ids .*mine.txt: 1 id\(s\) also in the train or val list"):
        kitti_splits(tmp_path, labelled, test_ids=tmp_path / "mine.txt")


def test_a_training_config_never_names_the_test_split():
    from clockdistill.config.layers import resolve_config
    from clockdistill.errors import ConfigError

    for key in ("train_split", "val_split"):
        with pytest.raises(ConfigError, match=rf"^data.{key}: 'test' is the held-out test split"):
            resolve_config({"data": {key: "test"}})


def test_kitti_bad_label_line(tmp_path):
    kitti = make_kitti(tmp_path / "kitti")
    (kitti / "training" / "label_2" / "000002.txt").write_text("Car 0.0 0\n")
    with pytest.raises(DataError, match=r"000002.txt:1: expected 15 fields"):
        convert_kitti(kitti, tmp_path / "out")


def test_coco_2017_becomes_three_splits_with_val2017_held_out(tmp_path):
    """A seeded slice of train2017 selects, val2017 is the test split; images are linked, not copied."""
    from clockdistill.data.coco_splits import split_coco

    coco = tmp_path / "coco"
    for split, n in (("train2017", 12), ("val2017", 5)):
        images = [{"id": 100 * (split == "val2017") + i, "file_name": f"{i}.png", "width": 40, "height": 30}
                  for i in range(1, n + 1)]  # fmt: skip
        anns = [{"id": k + 1, "image_id": img["id"], "category_id": 1, "bbox": [2, 2, 9, 9], "area": 81, "iscrowd": 0}
                for k, img in enumerate(images)]  # fmt: skip
        write_coco(coco, split, images, anns)  # annotations/instances_<split>.json, images/<split>/
        (coco / "images" / split).rename(coco / split)  # COCO's own layout: <coco>/train2017/
    counts = split_coco(coco, tmp_path / "out", val_images=4, seed=1)
    assert counts == {"train": 8, "val": 4, "test": 5}
    doc = {s: json.loads((tmp_path / "out" / "annotations" / f"instances_{s}.json").read_text()) for s in counts}
    train_ids, val_ids = ({i["id"] for i in doc[s]["images"]} for s in ("train", "val"))
    assert not train_ids & val_ids and train_ids | val_ids == set(range(1, 13))
    assert {a["image_id"] for a in doc["val"]["annotations"]} == val_ids
    assert split_coco(coco, tmp_path / "again", val_images=4, seed=1) == counts  # the same slice for the same seed
    again = json.loads((tmp_path / "again" / "annotations" / "instances_val.json").read_text())
    assert {i["id"] for i in again["images"]} == val_ids
    test = CocoDetection(tmp_path / "out", "test", DetectionTransform(64, train=False))
    assert len(test) == 5 and (tmp_path / "out" / "images" / "test").resolve() == (coco / "val2017").resolve()
    with pytest.raises(DataError, match=r"--val: expected 1 to 11"):
        split_coco(coco, tmp_path / "bad", val_images=12)
