import pytest
import torch

from clockdistill.evaluation.coco import coco_evaluate, postprocess, to_coco_results


def gt_dataset():
    return {
        "images": [{"id": 7, "file_name": "a.png", "width": 200, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [100, 20, 50, 60], "area": 3000, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "box"}],
    }


def test_ap_matches_hand_computation():
    # Ranked detections: TP (0.9), FP (0.8), TP (0.7). Precision is 1 up to recall 0.5 and 2/3 up to
    # recall 1. COCO interpolates at 101 recall points: 51 points at precision 1, 50 at 2/3; the
    # boxes are exact, so every IoU threshold gives the same AP.
    results = [
        {"image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 7, "category_id": 3, "bbox": [160, 60, 20, 20], "score": 0.8},
        {"image_id": 7, "category_id": 3, "bbox": [100, 20, 50, 60], "score": 0.7},
    ]
    stats = coco_evaluate(gt_dataset(), results)
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert stats["AP"] == pytest.approx(expected, abs=1e-9)
    assert stats["AP50"] == pytest.approx(expected, abs=1e-9)
    assert stats["AP/box"] == pytest.approx(expected, abs=1e-9)
    assert stats["AR100"] == pytest.approx(1.0)
    # Only the FP ranked last: precision is 1 at every recall.
    results[1]["score"] = 0.1
    assert coco_evaluate(gt_dataset(), results)["AP"] == pytest.approx(1.0)


def test_postprocess_converts_to_absolute_xywh_and_dataset_ids():
    # One query, cxcywh (0.25, 0.5, 0.2, 0.4) on a 200 x 100 image -> xyxy (30, 30, 70, 70) -> xywh (30, 30, 40, 40).
    outputs = {"pred_logits": torch.tensor([[[-5.0, 4.0]]]), "pred_boxes": torch.tensor([[[0.25, 0.5, 0.2, 0.4]]])}
    dets = postprocess(outputs, torch.tensor([[100, 200]]))
    res = to_coco_results(dets, [7], label_to_cat=[11, 3])
    best = max(res, key=lambda r: r["score"])
    assert best["category_id"] == 3 and best["image_id"] == 7
    assert best["bbox"] == pytest.approx([30.0, 30.0, 40.0, 40.0], abs=1e-3)
    assert len(res) == 2  # top-k over (query, class) pairs


def test_no_detections_gives_zero_ap():
    assert coco_evaluate(gt_dataset(), [])["AP"] == 0.0


def test_predictions_are_the_same_with_loader_workers(synth_data):
    """predict with decoding workers (and pinned memory on a GPU) gives the same detections in the same
    order as in the main process."""
    from clockdistill.config.layers import resolve_config
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform
    from clockdistill.engine import predict
    from clockdistill.models.build import build_detector

    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student"}, "data": {"root": str(synth_data)}})
    model = build_detector(cfg.model, 4)
    dataset = CocoDetection(str(synth_data), "val", DetectionTransform(cfg.data.max_size, train=False))
    alone = predict(model, dataset, torch.device("cpu"), 4, canvas=cfg.data.canvas)
    workers = predict(model, dataset, torch.device("cpu"), 4, canvas=cfg.data.canvas, num_workers=2)
    assert workers[1] == alone[1] and len(alone[0]) > 0
    labels = [[(r["image_id"], r["category_id"]) for r in rows] for rows in (alone[0], workers[0])]
    assert labels[0] == labels[1]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(alone[0], workers[0])) < 1e-6
