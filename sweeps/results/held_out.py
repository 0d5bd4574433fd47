"""The winner, the sweep's student trained alone and the teacher on the held-out test split.

A sweep chose its winner on the validation split, so the winner's validation AP is optimistic (the
best of many noisy trials). The test split (annotations/instances_test.json of the data set; no
training run or sweep trial can read it: config/sections.py) is where best-student measures all
three, each with a 95% bootstrap interval over test images, and the paired difference winner - alone
on the same resamples (clockdistill/evaluation/bootstrap.py). A data set without a test split gets
no such figures, and best-student says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clockdistill import metrics as M
from clockdistill.checkpoint import load_detector
from clockdistill.config.layers import resolve_config
from clockdistill.config.sections import TEST_SPLIT
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.transforms import DetectionTransform
from clockdistill.engine import predict
from clockdistill.evaluation.bootstrap import bootstrap, match_images
from clockdistill.evaluation.kitti import has_kitti_fields, kitti_evaluate

log = logging.getLogger(__name__)

WINNER, ALONE, TEACHER = "winner", "alone", "teacher"


@dataclass
class Contender:
    key: str  # WINNER, ALONE or TEACHER
    label: str  # how the table names it
    checkpoint: Path
    selection_ap: float | None  # its validation AP as the sweep recorded it


def test_annotations(data_root: str | Path) -> Path:
    return Path(data_root) / "annotations" / f"instances_{TEST_SPLIT}.json"


def test_predictions(checkpoint: Path, data_root: str | Path, device: torch.device):
    """COCO-format detections of a checkpoint on the test split, and its image ids: the model at its own
    input size, padding and precision, as it was evaluated during training."""
    model, meta = load_detector(checkpoint, device)
    cfg = resolve_config(meta["config"])
    dataset = CocoDetection(data_root, TEST_SPLIT, DetectionTransform.for_data(cfg.data, train=False))
    # in the precision it trained and was selected in (train.amp)
    return predict(
        model, dataset, device, cfg.train.batch_size * 2, cfg.train.amp, canvas=cfg.data.canvas,
        num_workers=cfg.data.num_workers,
    )  # fmt: skip


def held_out_report(
    contenders: list[Contender], data_root: str | Path, device: torch.device, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Test AP with its interval for each contender, the paired gain of the winner over the student
    alone, and the winner's selection gap, on the test split of `data_root` (test_annotations)."""
    annotations = test_annotations(data_root)
    ground_truth = json.loads(annotations.read_text())
    matches, kitti = {}, {}
    for c in contenders:
        results, ids = test_predictions(c.checkpoint, data_root, device)
        matches[c.key] = match_images(ground_truth, results, ids)
        if has_kitti_fields(ground_truth):  # KITTI's own figures too (point values: the bootstrap is COCO AP's)
            kitti[c.key] = kitti_evaluate(ground_truth, results, ids)
    keys = {c.key for c in contenders}
    report = bootstrap(
        matches, pairs=[(WINNER, ALONE)] if {WINNER, ALONE} <= keys else [], resamples=resamples, seed=seed
    )
    for c in contenders:
        report["models"][c.key].update(label=c.label, selection_AP=c.selection_ap)
        if c.key in kitti:
            report["models"][c.key]["kitti"] = kitti[c.key]
    winner = report["models"][WINNER]
    if winner["selection_AP"] is not None:
        report["selection_gap"] = winner["selection_AP"] - winner["AP"]
    report["data"] = str(annotations)
    return report


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """What goes on the winner's MLflow run (and the registered version's tags)."""
    winner = report["models"][WINNER]
    out = {M.TEST_AP: winner["AP"], M.TEST_AP + M.LOW: winner["low"], M.TEST_AP + M.HIGH: winner["high"]}
    gain = report["differences"].get(f"{WINNER} - {ALONE}")
    if gain:
        out.update({M.TEST_GAIN: gain["AP"], M.TEST_GAIN + M.LOW: gain["low"], M.TEST_GAIN + M.HIGH: gain["high"]})
    if "selection_gap" in report:
        out[M.SELECTION_GAP] = report["selection_gap"]
    return out


def gain_sentence(report: dict[str, Any]) -> str:
    """One line on what distillation gained on held-out images, never more than the interval shows."""
    gain = report["differences"].get(f"{WINNER} - {ALONE}")
    if not gain:
        return "no student trained alone in this sweep (spec baseline_trial): the gain of distillation is not measured"
    interval = f"{100 * gain['AP']:+.2f} AP [{100 * gain['low']:+.2f}, {100 * gain['high']:+.2f}]"
    if gain["low"] > 0:
        return f"distillation gained {interval} over the student alone on the held-out test images"
    if gain["high"] < 0:
        return f"distillation lost {interval} against the student alone on the held-out test images"
    return f"on the held-out test images distillation changed AP by {interval}: the interval spans 0, no gain shown"


def table(report: dict[str, Any]) -> str:
    """model / selection AP (val) / test AP [interval], and the lines under it."""
    level = int(round(100 * report["level"]))
    lines = [f"{'model':<36} {'val AP':>8}   {'test AP':>7} [{level}% interval]"]
    for key in (TEACHER, ALONE, WINNER):
        m = report["models"].get(key)
        if m is None:
            continue
        val = f"{m['selection_AP']:.4f}" if m.get("selection_AP") is not None else "-"
        lines.append(f"{m['label']:<36} {val:>8}   {m['AP']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")
    if any("kitti" in report["models"][k] for k in report["models"]):
        lines.append(f"{'KITTI AP|R40, mean of classes (test)':<36} {'easy':>8} {'moderate':>9} {'hard':>8}")
        for key in (TEACHER, ALONE, WINNER):
            k = (report["models"].get(key) or {}).get("kitti")
            if k:
                means = [k[M.kitti_metric(None, d)] for d in M.KITTI_DIFFICULTIES]
                cells = " ".join(f"{v:>{w}.4f}" for v, w in zip(means, (8, 9, 8)))
                lines.append(f"{report['models'][key]['label']:<36} {cells}")
    if "selection_gap" in report:
        lines.append(
            f"the winner's val AP is {report['selection_gap']:+.4f} over its test AP (chosen as the best on val)"
        )
    lines.append(gain_sentence(report))
    lines.append(
        f"test split: {report['images']} images ({report['data']}), never read by the sweep; bootstrap over images, "
        f"{report['resamples']} resamples ({report['seconds']:.1f} s)"
    )
    return "\n".join(lines)
