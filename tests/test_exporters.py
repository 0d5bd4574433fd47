"""TorchScript and ONNX exports of every detector family give the eager model's outputs."""

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.exporters import (
    Predictions,
    device_constants,
    max_abs_difference,
    onnx_available,
    to_onnx,
    to_torchscript,
)
from clockdistill.models.build import build_detector

SIZE = 96


def _model_and_batch(preset: str):
    torch.manual_seed(0)
    model = build_detector(resolve_config({"model": {"preset": preset}}).model, 3).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[1, 64:, :] = True  # a padded image
    return model, (images, mask)


@pytest.mark.parametrize(
    "preset",
    [
        "deformable-detr-tiny-student",
        "deformable-detr-tiny-student-refine",
        "deformable-detr-tiny-student-two-stage",
        "dab-detr-tiny-student",
        "dino-tiny-student",
    ],
)
def test_torchscript_export_matches_eager(preset, tmp_path):
    """Equal to eager at two batch sizes, after a save and load too; and no device constant left in the
    trace (a tensor made on the export's device would stay on the CPU when the model runs on a GPU)."""
    model, example = _model_and_batch(preset)
    scripted = to_torchscript(model, example, SIZE)
    assert device_constants(scripted.traced) == 0
    with torch.no_grad():
        traced = torch.jit.trace(Predictions(model), example, check_trace=False)
    assert device_constants(traced) > 0  # what the trace records before follow_input_device
    scripted.save(str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    other = (torch.randn(3, 3, SIZE, SIZE), torch.zeros(3, SIZE, SIZE, dtype=torch.bool))  # another batch size
    with torch.no_grad():
        for batch in (example, other):
            eager = model(*batch)
            for exported in (scripted, loaded):
                assert max_abs_difference(exported(*batch), (eager["pred_logits"], eager["pred_boxes"])) < 1e-5


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed")
@pytest.mark.parametrize(
    "preset", ["deformable-detr-tiny-student-two-stage", "dab-detr-tiny-student", "dino-tiny-student"]
)
def test_onnx_export_matches_eager(preset, tmp_path):
    model, example = _model_and_batch(preset)
    assert to_onnx(model, example, tmp_path / "model.onnx") < 1e-4
