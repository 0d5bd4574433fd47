"""Starting weights are applied once, when a run starts fresh; construction reads no file, and a
checkpoint loads from its own directory alone (weights/start.py)."""

import shutil

import pytest
import torch

from clockdistill.checkpoint import load_detector, save_checkpoint
from clockdistill.config.layers import resolve_config
from clockdistill.data.synth import CLASSES
from clockdistill.engine import fit
from clockdistill.models.build import build_detector
from clockdistill.models.resnet import ResNet


def _images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)


def test_building_a_detector_reads_no_file(tmp_path):
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student", "backbone_weights": str(tmp_path / "gone.pth")}})
    build_detector(cfg.model, 3)  # the file does not exist: nothing reads it here


def test_a_checkpoint_started_from_files_loads_after_they_are_gone(synth_data, tmp_path):
    """A run started from an ImageNet backbone file and a checkpoint to fine-tune (train.lr 0: the
    trained weights are the starting ones) saves a checkpoint whose config names both files and
    the data; with all three deleted it loads and gives the same outputs."""
    torch.manual_seed(0)
    backbone = ResNet(18, 0.125, "batch")
    torch.nn.init.normal_(backbone.conv1.weight)  # not the fresh initialisation
    torch.save(backbone.state_dict(), tmp_path / "resnet18.pth")
    base = resolve_config({"model": {"preset": "hybrid-tiny-student", "num_classes": 4}})
    start = build_detector(base.model, 4)
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_checkpoint(tmp_path / "start", start, {"config": base.to_dict(), "class_names": CLASSES})  # the data's
    data = shutil.copytree(synth_data, tmp_path / "data")
    cfg = resolve_config(
        {
            "data": {"root": str(data), "max_size": 64},
            "model": {"preset": "hybrid-tiny-student", "backbone_weights": str(tmp_path / "resnet18.pth")},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "lr": 0.0,
                "lr_backbone": 0.0,
                "init_from": str(tmp_path / "start"),
                "output_dir": str(tmp_path / "run"),
                "progress": False,
                "device": "cpu",
            },
        }
    )
    fit(cfg)
    trained, _ = load_detector(tmp_path / "run" / "last")
    names = {n for n, _ in start.named_parameters()}
    # train.init_from came last: every parameter is the starting checkpoint's (lr 0), none fresh
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in trained.state_dict().items() if k in names)
    with torch.no_grad():
        before = trained(*_images())
    for gone in (tmp_path / "resnet18.pth", tmp_path / "start", data):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    again, meta = load_detector(tmp_path / "run" / "last")
    assert meta["config"]["model"]["backbone_weights"] == str(tmp_path / "resnet18.pth")  # recorded, not read
    with torch.no_grad():
        after = again(*_images())
    assert torch.equal(before["pred_logits"], after["pred_logits"])
    assert torch.equal(before["pred_boxes"], after["pred_boxes"])


def test_the_backbone_file_starts_the_run_and_a_resumed_run_does_not_read_it(synth_data, tmp_path):
    torch.manual_seed(0)
    backbone = ResNet(18, 0.125, "batch")
    torch.nn.init.normal_(backbone.conv1.weight)
    torch.save(backbone.state_dict(), tmp_path / "resnet18.pth")
    settings = {
        "data": {"root": str(synth_data), "max_size": 64},
        "model": {"preset": "hybrid-tiny-student", "backbone_weights": str(tmp_path / "resnet18.pth")},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.0, "lr_backbone": 0.0, "output_dir": str(tmp_path / "run")},
    }
    fit(resolve_config(settings, overrides={"train.progress": False, "train.device": "cpu"}))
    trained, _ = load_detector(tmp_path / "run" / "last")
    assert torch.equal(trained.backbone.conv1.weight, backbone.conv1.weight)
    (tmp_path / "resnet18.pth").unlink()
    result = fit(resolve_config(settings, overrides={"train.epochs": 2, "train.progress": False}))
    assert [h["epoch"] for h in result.history] == [1, 2]  # resumed: the file was not needed


@pytest.mark.parametrize("preset", ["hybrid-tiny-student", "deformable-detr-tiny-student"])
def test_a_checkpoint_in_the_old_form_with_its_backbone_file_named_still_loads(preset, tmp_path):
    """Checkpoints written before construction became pure carry model.backbone_weights too."""
    cfg = resolve_config({"model": {"preset": preset, "backbone_weights": "/nowhere/resnet.pth", "num_classes": 3}})
    model = build_detector(cfg.model, 3).eval()
    save_checkpoint(tmp_path / "ck", model, {"config": cfg.to_dict(), "class_names": ["a", "b", "c"]})
    loaded, _ = load_detector(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(*_images())["pred_logits"], loaded(*_images())["pred_logits"])


@pytest.mark.parametrize("preset", ["rtdetr-tiny-student", "dfine-tiny-student"])
def test_the_real_time_detectors_start_from_their_references_imagenet_backbone_files(preset, tmp_path):
    """RT-DETR's ResNet-vd and D-FINE's HGNetV2 load the files their references start from: the
    backbone's own state dict under the reference's names (ours; tests/bench/parity_*.py load ours into
    the references strictly); a file of the other backbone is refused in one line."""
    from clockdistill.errors import UserError
    from clockdistill.weights.start import apply_starting_weights

    torch.manual_seed(0)
    source = build_detector(resolve_config({"model": {"preset": preset}}).model, 3).backbone
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    cfg = resolve_config({"model": {"preset": preset, "backbone_weights": str(tmp_path / "imagenet.pth")}})
    model = build_detector(cfg.model, 3)
    apply_starting_weights(model, cfg, [])
    for name, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name
    other = "dfine-tiny-student" if preset.startswith("rtdetr") else "rtdetr-tiny-student"
    with pytest.raises(UserError, match="is not this backbone"):
        apply_starting_weights(build_detector(resolve_config({"model": {"preset": other}}).model, 3), cfg, [])
