"""RT-DETR and RT-DETRv2 (clockdistill/models/rtdetr.py) against transformers' RTDetrForObjectDetection
and RTDetrV2ForObjectDetection (bilinear and discrete sampling), oracles no one here wrote: tiny random
models with every tensor perturbed, saved as a Hugging Face directory, imported with `clockdistill
import`, then the hybrid encoder's maps, the query selection's proposals and every decoder layer's
logits and boxes compared on a 2-image batch; training, distillation and export of the tiny presets."""

from __future__ import annotations

import pytest
import torch

from clockdistill.checkpoint import load_detector
from clockdistill.config.layers import resolve_config
from clockdistill.models.build import build_detector
from clockdistill.weights.importer import import_checkpoint

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' port (dev extra)")

BACKBONES = {  # ResNet-vd layouts at reduced width: R18 (basic blocks) and R50 (bottlenecks)
    "r18": dict(layer_type="basic", depths=[2, 2, 2, 2], embedding_size=16, hidden_sizes=[16, 32, 64, 128]),
    "r50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], embedding_size=8, hidden_sizes=[32, 64, 128, 256]),
}


def _oracle(backbone: str, version: str = "v1"):
    """A tiny transformers RTDetr (v1) or RTDetrV2 ("v2": bilinear, "v2-discrete") with perturbed tensors."""
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrResNetConfig,
        RTDetrV2Config,
        RTDetrV2ForObjectDetection,
    )

    bb = RTDetrResNetConfig(**BACKBONES[backbone], out_features=["stage2", "stage3", "stage4"])
    channels = BACKBONES[backbone]["hidden_sizes"][1:]
    config_class, model_class = (RTDetrConfig, RTDetrForObjectDetection)
    extra = {}
    if version != "v1":
        config_class, model_class = (RTDetrV2Config, RTDetrV2ForObjectDetection)
        extra = dict(decoder_method="discrete" if version == "v2-discrete" else "default", decoder_offset_scale=0.6)
    cfg = config_class(
        backbone_config=bb,
        encoder_hidden_dim=32,
        encoder_in_channels=channels,
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=48,
        encoder_attention_heads=4,
        hidden_expansion=0.5,
        d_model=32,
        decoder_ffn_dim=64,
        decoder_attention_heads=4,
        decoder_layers=3,
        num_queries=20,
        num_denoising=10,
        num_labels=3,
        **extra,
    )
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    with torch.no_grad():  # every tensor away from its initial value (zero heads, unit norms, ...)
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("n_points_scale"):  # (RT-DETRv2: 1 / points, derived)
                continue
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * (0.1 if t.dim() == 1 else 0.05))
    return model


@pytest.mark.parametrize("backbone,version", [("r18", "v1"), ("r50", "v1"), ("r18", "v2"), ("r18", "v2-discrete")])
def test_rtdetr_matches_transformers_after_import(backbone, version, tmp_path):
    oracle = _oracle(backbone, version)
    oracle.save_pretrained(tmp_path / "hf")
    meta = import_checkpoint(tmp_path / "hf", tmp_path / "ck")
    model_cfg = meta["config"]["model"]
    assert model_cfg["arch"] == "rtdetr" and model_cfg["rtdetr_version"] == (1 if version == "v1" else 2)
    assert model_cfg["preset"] == ("rtdetr" if version == "v1" else "rtdetrv2") + f"-{backbone}"
    ours, _ = load_detector(tmp_path / "ck")
    ours.eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        theirs = oracle(pixel_values=images)
        out = ours(images, mask)
        maps, _ = ours.encoder(ours.backbone(images))
    enc = theirs.encoder_last_hidden_state
    enc = enc if isinstance(enc, (list, tuple)) else [enc]
    for a, b in zip(maps, enc):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["interm_outputs"]["pred_logits"], theirs.enc_topk_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["interm_outputs"]["pred_boxes"], theirs.enc_topk_bboxes, atol=1e-4, rtol=0)
    layers = [*out["aux_outputs"], out]
    assert len(layers) == theirs.intermediate_logits.shape[1] == 3
    for i, layer in enumerate(layers):
        torch.testing.assert_close(layer["pred_logits"], theirs.intermediate_logits[:, i], atol=1e-4, rtol=0)
        torch.testing.assert_close(layer["pred_boxes"], theirs.intermediate_reference_points[:, i], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_logits"], theirs.logits, atol=1e-4, rtol=0)


def test_presets_have_the_published_sizes():
    """Parameter counts of the published RT-DETR models (80 classes): R18 20M, R34 31M, R50 42M, R101 76M."""
    published = {"rtdetr-r18": 20e6, "rtdetr-r34": 31e6, "rtdetr-r50": 42e6, "rtdetr-r101": 76e6}
    for preset, count in published.items():
        model = build_detector(resolve_config({"model": {"preset": preset}}).model, 80)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.05, (preset, n)


def test_training_steps_with_denoising_and_varifocal_loss_fit_a_batch():
    """The tiny preset trains: denoising queries and the selected proposals are supervised (varifocal
    classification, L1, GIoU at the published weights), and the loss of one batch falls."""
    from conftest import fit_one_batch

    history, losses, cfg = fit_one_batch("rtdetr-tiny-student")
    assert (cfg.loss.cls_loss, cfg.loss.cls, cfg.loss.bbox, cfg.loss.giou) == ("vfl", 1.0, 5.0, 2.0)
    assert {"loss_cls_dn", "loss_cls_interm", "loss_giou_1"} <= set(losses)
    # measured over seeds 0-4 (one thread): the last five steps' lowest loss is 0.33-0.41 of the first
    assert min(history[-5:]) < 0.6 * history[0], history


@pytest.mark.parametrize("method", ["clockdistill"])
def test_cli_distills_an_rtdetr_teacher_into_the_rtdetr_student(method, synth_data, tmp_path):
    """The tiny pair through `clockdistill distill`: memory distillation on the hybrid encoder's memory,
    target-aware queries through both decoders, the student preset following from the teacher's."""
    import json

    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.data.synth import CLASSES
    from conftest import run_cli

    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": "rtdetr-tiny-teacher"}, "data": {"root": str(synth_data)}})
    teacher = build_detector(tcfg.model, len(CLASSES))
    save_checkpoint(tmp_path / "teacher", teacher, {"config": tcfg.to_dict(), "class_names": list(CLASSES)})
    sets = ["train.epochs=1", "train.progress=false", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}"]
    sets.append(f"distill.method={method}")
    proc = run_cli("distill", "--teacher", str(tmp_path / "teacher"), *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1 :])
    assert summary["method"] == method and 0 <= summary["best_AP"] <= 1
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert meta["config"]["model"]["preset"] == "rtdetr-tiny-student" and meta["config"]["loss"]["cls_loss"] == "vfl"


@pytest.mark.parametrize("preset", ["rtdetr-tiny-student", "dfine-tiny-student"])
def test_the_real_time_students_export_to_torchscript_and_onnx(preset, tmp_path):
    """The deployment forms best-student writes: TorchScript equal to eager, ONNX within 1e-4 of it
    (onnxruntime, when the onnx extra is installed)."""
    from clockdistill.exporters import max_abs_difference, onnx_available, to_onnx, to_torchscript

    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": preset}, "data": {"max_size": 128}})
    model = build_detector(cfg.model, 3).eval()
    example = (torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool))
    scripted = to_torchscript(model, example, 128)
    with torch.no_grad():
        eager = model(*example)
        assert max_abs_difference((eager["pred_logits"], eager["pred_boxes"]), tuple(scripted(*example))) < 1e-5
    if onnx_available():
        assert to_onnx(model, example, tmp_path / "student.onnx") < 1e-4


def test_a_deformable_teacher_distils_into_an_rtdetr_student_over_the_shared_strides(tmp_path):
    """Across architectures the memory terms compare the levels of equal stride on their common grid
    (Deformable DETR's 8/16/32/64 against RT-DETR's 8/16/32, whose grids are larger after its pad to
    32), through the adapter where the widths differ; a pair that shares no stride is refused in one
    line. (The teacher cache across architectures: tests/test_caches.py.)"""
    from types import SimpleNamespace

    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.distill.cache import cache_blockers
    from clockdistill.distill.distiller import Distiller
    from clockdistill.distill.pairing import memory_pairing, memory_strides
    from clockdistill.distill.teacher import FrozenTeacher
    from clockdistill.errors import ConfigError

    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": "deformable-detr-tiny-teacher"}})
    teacher = build_detector(tcfg.model, 3).eval()
    save_checkpoint(tmp_path / "teacher", teacher, {"config": tcfg.to_dict(), "class_names": ["a", "b", "c"]})
    cfg = resolve_config(
        {"model": {"preset": "rtdetr-tiny-student", "d_model": 32}, "distill": {"teacher": str(tmp_path / "teacher")}}
    )
    student = build_detector(cfg.model, 3).train()
    assert memory_strides(tcfg.model) == [8, 16, 32, 64] and memory_strides(cfg.model) == [8, 16, 32]
    d = Distiller(FrozenTeacher(teacher), student, cfg)
    assert d.pairing.pairs == [(0, 0, 8), (1, 1, 16), (2, 2, 32)] and d.adapter is not None
    images = torch.rand(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True  # the second image is narrower
    targets = [
        {"size": torch.tensor([96, 128]), "labels": torch.tensor([0, 2]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"size": torch.tensor([96, 96]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3]])},
    ]  # fmt: skip
    terms, weights = d.losses(images, mask, targets)
    assert terms["kd_mem_fg"] > 0 and terms["kd_mem_bg"] > 0 and any(k.startswith("kd_cls") for k in terms)
    sum(weights[k] * v for k, v in terms.items()).backward()
    assert d.adapter.weight.grad.abs().sum() > 0 and student.encoder.input_proj[0][0].weight.grad.abs().sum() > 0
    # the common grids: 12x16, 6x8, 3x4 (the teacher's) of the student's 16x16, 8x8, 4x4; the narrower
    # image's columns from 96 px on are padding
    with torch.no_grad():
        mem_t, mem_s = teacher.encode(images, mask), student.encode(images, mask)
    t, s, shapes, padding, extents = d.pairing.select(
        mem_t.memory, mem_t.spatial_shapes, mem_s.memory, mem_s.spatial_shapes, mask
    )
    assert shapes == [(12, 16), (6, 8), (3, 4)] and extents == [(96, 128), (96, 128), (96, 128)]
    assert t.shape[1] == s.shape[1] == padding.shape[1] == 12 * 16 + 6 * 8 + 3 * 4
    assert not padding[0].any() and padding[1, : 12 * 16].view(12, 16)[:, 12:].all()
    assert not padding[1, : 12 * 16].view(12, 16)[:, :12].any()
    assert torch.equal(s[:, :16], mem_s.memory[:, :16])  # row 0 of the student's stride-8 grid, cropped to 16
    assert torch.equal(s[:, 16:32], mem_s.memory[:, 16:32])  # row 1 starts at the student's 17th token
    assert not any("architecture" in r for r in cache_blockers(cfg))
    with pytest.raises(
        ConfigError, match=r"^model: the teacher's memory levels \(strides \[16\], dab\) .* share no stride"
    ):
        memory_pairing(SimpleNamespace(arch="dab", dilation=True), SimpleNamespace(arch="rtdetr", num_levels=1))


@pytest.mark.parametrize("version", ["rtdetr", "rtdetrv2"])
def test_an_original_rtdetr_checkpoint_imports(version, tmp_path):
    """A checkpoint of lyuwenyu/RT-DETR's trainers ({"ema": {"module": state}}) under the reference's
    names, whose key/shape manifests the parity benchmark recorded from the reference's own models
    (tests/bench/parity_rtdetr.py: rtdetr_pytorch, rtdetrv2_pytorch), imports with every size read off
    the tensors and what they cannot tell asked for in one line, and gives our model's outputs exactly."""
    import json
    from pathlib import Path

    from clockdistill.errors import UserError
    from clockdistill.weights.layouts import original_names

    manifest = json.loads((Path(__file__).parent / "data" / f"{version}_reference_keys.json").read_text())
    cfg = resolve_config({"model": manifest["model"]})
    torch.manual_seed(0)
    ours = build_detector(cfg.model, 3).eval()
    with torch.no_grad():
        for name, t in ours.state_dict().items():
            if t.is_floating_point() and not name.endswith("num_points_scale"):
                t.add_(torch.randn_like(t) * 0.05)
    state = original_names(ours.state_dict(), "rtdetr", cfg.model.rtdetr_version)
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    state.update({"decoder.anchors": torch.zeros(1, 8400, 4), "decoder.valid_mask": torch.ones(1, 8400, 1)})
    torch.save({"ema": {"module": state, "updates": 100}, "last_epoch": 3}, tmp_path / "rtdetr.pth")
    asked = "model.cross_attn_method, model.num_queries" if version == "rtdetrv2" else "model.nheads or model.n_points"
    with pytest.raises(UserError, match=asked):
        import_checkpoint(tmp_path / "rtdetr.pth", tmp_path / "refused")
    sets = ["model.num_queries=20"] + (
        ["model.cross_attn_method=default"] if version == "rtdetrv2" else ["model.nheads=4"]
    )
    meta = import_checkpoint(tmp_path / "rtdetr.pth", tmp_path / "ck", overrides=sets)
    m = meta["config"]["model"]
    want = dict(backbone_depth=18, backbone_width=1.0, d_model=64, nheads=4, ffn_dim=128, dec_layers=3, expansion=0.5)
    assert {k: m[k] for k in want} == want and m["preset"] == f"{version}-r18" and m["num_queries"] == 20
    loaded, _ = load_detector(tmp_path / "ck")
    loaded.eval()
    images, mask = torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        a, b = ours(images, mask), loaded(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_the_shipped_real_time_student_is_what_its_recipe_names():
    """sweeps/assets/rtdetr-student (the cross-architecture study's starting weights: rtdetr-tiny-student
    alone by the demo students' recipe) is the file its recipe's sha256 names and loads as its preset."""
    import json
    from pathlib import Path

    from sweeps.demo import check_shipped

    shipped = Path(__file__).resolve().parents[1] / "sweeps" / "assets" / "rtdetr-student"
    recipe = json.loads((shipped / "recipe.json").read_text())
    assert recipe["preset"] == "rtdetr-tiny-student"
    assert check_shipped(shipped, recipe["preset"], recipe["command"]) == shipped
    model, meta = load_detector(shipped)
    assert meta["config"]["model"]["arch"] == "rtdetr" and meta["config"]["data"]["resize"] == "square"
