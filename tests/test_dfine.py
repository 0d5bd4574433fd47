"""D-FINE (clockdistill/models/dfine.py, models/hgnetv2.py, losses/fdr.py) against transformers'
DFineForObjectDetection, an oracle no one here wrote: tiny random models with every tensor perturbed
(convolutions at a He-scale: transformers' 0.01 initialisation collapses a tiny HGNetV2's maps into
near-identical tokens, whose query selection then ties), saved as a Hugging Face directory, imported
with `clockdistill import`, then the encoder's maps, the selected proposals, the pre-box head and every
decoder layer's logits, boxes, edge distributions and reference boxes compared on a 2-image batch;
the localisation losses' pieces checked against the decoding they invert; training, distillation and
export of the tiny presets (the export test: tests/test_rtdetr.py)."""

from __future__ import annotations

import pytest
import torch

from clockdistill.checkpoint import load_detector
from clockdistill.config.layers import resolve_config
from clockdistill.models.build import build_detector
from clockdistill.models.hgnetv2 import variant
from clockdistill.weights.importer import import_checkpoint

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' port (dev extra)")


def _oracle(levels: int, lab: bool, method: str):
    """A tiny transformers DFine: HGNetV2 B0 at 1/4 width, `levels` memory levels (3: S-M-L-X, 2: N)."""
    from transformers import DFineForObjectDetection

    tiny = dict(hgnet="B0", backbone_width=0.25, use_lab=lab, num_levels=levels, level_points=[3, 6, 3][:levels])
    tiny.update(d_model=32, ffn_dim=64, encoder_ffn_dim=48, nheads=4, dec_layers=3, num_queries=20, dn_number=10)
    m = resolve_config({"model": {"preset": "dfine-s", **tiny, "expansion": 0.5, "depth_mult": 0.34}}).model
    cfg = _hf_config(m, 3)
    cfg.decoder_method = method
    torch.manual_seed(0)
    model = DFineForObjectDetection(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith(("num_points_scale", ".up", "reg_scale")):  # derived, or the method's constants
                continue
            elif t.dim() == 4:
                t.copy_(torch.randn_like(t) * (2 / t[0].numel()) ** 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * (0.1 if t.dim() == 1 else 0.05))
    return model


@pytest.mark.parametrize("levels,lab,method", [(3, True, "default"), (2, False, "discrete")])
def test_dfine_matches_transformers_after_import(levels, lab, method, tmp_path):
    oracle = _oracle(levels, lab, method)
    oracle.save_pretrained(tmp_path / "hf")
    meta = import_checkpoint(tmp_path / "hf", tmp_path / "ck")
    m = meta["config"]["model"]
    assert (m["arch"], m["hgnet"], m["backbone_width"], m["use_lab"]) == ("dfine", "B0", 0.25, lab)
    assert m["preset"] == ("dfine-s" if levels == 3 else "dfine-n") and m["level_points"] == [3, 6, 3][:levels]
    ours, _ = load_detector(tmp_path / "ck")
    ours.eval()
    # transformers returns every layer's predictions in training only: train mode, BatchNorm in eval
    oracle.train()
    for module in oracle.modules():
        if "BatchNorm" in type(module).__name__:
            module.eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        theirs = oracle(pixel_values=images)
        out = ours(images, mask)
        maps, _ = ours.encoder(ours.backbone(images))
    for a, b in zip(maps, theirs.encoder_last_hidden_state, strict=True):  # values up to ~200: relative to that
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), float((a - b).abs().max())
    torch.testing.assert_close(out["interm_outputs"]["pred_logits"], theirs.enc_topk_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["interm_outputs"]["pred_boxes"], theirs.enc_topk_bboxes, atol=1e-4, rtol=0)
    # transformers stacks the pre-box head's output first, then the layers'
    torch.testing.assert_close(out["pre_outputs"]["pred_logits"], theirs.intermediate_logits[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        out["pre_outputs"]["pred_boxes"], theirs.intermediate_reference_points[:, 0], atol=1e-4, rtol=0
    )
    layers = [*out["aux_outputs"], out]
    assert len(layers) == theirs.intermediate_predicted_corners.shape[1] == 3
    for i, layer in enumerate(layers):
        torch.testing.assert_close(layer["pred_logits"], theirs.intermediate_logits[:, i + 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            layer["pred_boxes"], theirs.intermediate_reference_points[:, i + 1], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            layer["pred_corners"], theirs.intermediate_predicted_corners[:, i], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(layer["ref_points"], theirs.initial_reference_points[:, i], atol=1e-4, rtol=0)


def _hf_config(m, num_labels: int):
    """transformers' DFineConfig of one of our D-FINE model configs (its HGNetV2 from our variant table)."""
    from transformers import DFineConfig, HGNetV2Config

    (mid, out), stages = variant(m.hgnet, m.backbone_width)
    column = lambda i: [s[i] for s in stages]  # noqa: E731
    levels, enc = m.num_levels, m.encoder_dim or m.d_model
    backbone = HGNetV2Config(
        stem_channels=[3, mid, out],
        stage_in_channels=column(0),
        stage_mid_channels=column(1),
        stage_out_channels=column(2),
        stage_num_blocks=column(3),
        stage_downsample=column(4),
        stage_light_block=column(5),
        stage_kernel_size=column(6),
        stage_numb_of_layers=column(7),
        hidden_sizes=column(2),
        depths=column(3),
        use_learnable_affine_block=m.use_lab,
        out_features=["stage2", "stage3", "stage4"][3 - levels :],
    )
    return DFineConfig(
        backbone_config=backbone,
        encoder_hidden_dim=enc,
        encoder_in_channels=column(2)[4 - levels :],
        feat_strides=[8, 16, 32][3 - levels :],
        num_feature_levels=levels,
        encode_proj_layers=[levels - 1],
        decoder_in_channels=[enc] * levels,
        encoder_ffn_dim=m.encoder_ffn_dim or m.ffn_dim,
        encoder_attention_heads=m.nheads,
        hidden_expansion=m.expansion,
        depth_mult=m.depth_mult,
        d_model=m.d_model,
        decoder_ffn_dim=m.ffn_dim,
        decoder_attention_heads=m.nheads,
        decoder_layers=m.dec_layers,
        decoder_n_points=list(m.level_points) or [m.n_points] * levels,
        num_queries=m.num_queries,
        num_denoising=m.dn_number,
        num_labels=num_labels,
        reg_scale=m.reg_scale,
    )


def test_presets_have_the_published_sizes():
    """Every published size holds exactly as many weights as transformers' port builds from the same
    settings (BatchNorm statistics aside), and about the published parameter counts (80 classes): N 4M,
    S 10M, M 19M, L 31M, X 62M (measured: 3.78, 10.32, 19.59, 31.24, 62.62)."""
    from transformers import DFineForObjectDetection

    published = {"dfine-n": 4e6, "dfine-s": 10e6, "dfine-m": 19e6, "dfine-l": 31e6, "dfine-x": 62e6}
    counted = lambda state: sum(v.numel() for k, v in state.items() if not k.endswith(_STATS))  # noqa: E731
    for preset, count in published.items():
        cfg = resolve_config({"model": {"preset": preset}}).model
        model = build_detector(cfg, 80)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.06, (preset, n)
        theirs = DFineForObjectDetection(_hf_config(cfg, 80)).state_dict()  # (its heads' tied copies left out)
        assert counted(model.state_dict()) == counted(
            {k: v for k, v in theirs.items() if not k.startswith(("class_embed", "bbox_embed"))}
        ), preset


_STATS = ("running_mean", "running_var", "num_batches_tracked")


def test_edge_targets_invert_the_box_decoding():
    """FGL's targets (bbox2distance + translate_gt) are the inverse of decoding: the two bins around each
    edge, weighted, integrate under W(n) to the edge's distance, which distance2bbox turns back into the
    target box; an edge beyond W's range puts all weight on the end bin."""
    from clockdistill.losses.fdr import edge_targets
    from clockdistill.models.dfine import distance2bbox, weighting_function
    from clockdistill.ops.boxes import box_cxcywh_to_xyxy

    up, reg_scale, reg_max = torch.tensor([0.5]), torch.tensor([4.0]), 32
    values = weighting_function(reg_max, up, reg_scale)
    assert values.shape == (33,) and values[16] == 0 and torch.all(values[1:] > values[:-1])
    torch.manual_seed(0)
    ref = torch.cat([torch.rand(50, 2) * 0.6 + 0.2, torch.rand(50, 2) * 0.3 + 0.1], 1)
    target = torch.cat([ref[:, :2] + (torch.rand(50, 2) - 0.5) * 0.1, ref[:, 2:] * (0.7 + 0.6 * torch.rand(50, 2))], 1)
    index, right, left = edge_targets(ref, box_cxcywh_to_xyxy(target), reg_max, up, reg_scale)
    lo = index.long()
    distance = (values[lo] * left + values[lo + 1] * right).reshape(50, 4)
    torch.testing.assert_close(distance2bbox(ref, distance, reg_scale), target, atol=1e-5, rtol=0)
    far = torch.tensor([[0.5, 0.5, 0.02, 0.02]])  # a tiny reference box: every edge far beyond W's end
    index, right, left = edge_targets(far, torch.tensor([[0.1, 0.1, 0.9, 0.9]]), reg_max, up, reg_scale)
    assert torch.all(index == reg_max - 0.1) and torch.all(right == 1) and torch.all(left == 0)


def test_union_matching_keeps_each_querys_most_frequent_target():
    from clockdistill.losses.fdr import union_matching

    t = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    layers = [
        [(t(0, 1), t(0, 1)), (t(), t())],
        [(t(0, 2), t(1, 1)), (t(3), t(0))],
        [(t(0, 1), t(1, 0)), (t(3), t(0))],
    ]
    (q0, g0), (q1, g1) = union_matching(layers)
    # query 0: target 1 twice, 0 once; query 1: targets 1 and 0 once each (the smaller wins); query 2: one pair
    assert dict(zip(q0.tolist(), g0.tolist())) == {0: 1, 1: 0, 2: 1}
    assert dict(zip(q1.tolist(), g1.tolist())) == {3: 0}


def test_training_fits_a_batch_with_every_dfine_term():
    """The tiny preset trains: varifocal, L1 and GIoU on every layer, the pre-box head and the selected
    proposals, FGL on every layer and DDF on the earlier ones (the denoising queries' too), at the
    published weights; the loss of one batch falls."""
    from clockdistill.losses.criterion import model_detection_weights
    from conftest import fit_one_batch

    history, losses, cfg = fit_one_batch("dfine-tiny-student")
    assert (cfg.loss.cls_loss, cfg.loss.cls, cfg.loss.bbox, cfg.loss.giou) == ("vfl", 1.0, 5.0, 2.0)
    assert (cfg.loss.fgl, cfg.loss.ddf) == (0.15, 1.5)
    weights = model_detection_weights(cfg.loss, cfg.model)
    assert set(losses) == set(weights)
    assert {"loss_fgl", "loss_ddf_0", "loss_fgl_dn_1", "loss_ddf_dn_1", "loss_cls_pre", "loss_giou_dn_pre"} <= set(
        losses
    )
    assert "loss_ddf" not in losses  # the last layer is DDF's teacher
    # measured over seeds 0-4 (one thread): the last five steps' lowest loss is 0.52-0.61 of the first
    assert min(history[-5:]) < 0.75 * history[0], history


def test_cli_distills_the_dfine_teacher_into_the_dfine_student(synth_data, tmp_path):
    """`clockdistill distill` with CLoCKDistill on the tiny pair: memory token for token, the target-aware
    queries through both FDR decoders, the student's preset following from the teacher's. (Measured by
    hand: the hybrid teacher into this student across architectures runs the same way.)"""
    import json

    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.data.synth import CLASSES
    from conftest import run_cli

    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": "dfine-tiny-teacher"}, "data": {"root": str(synth_data)}})
    model = build_detector(tcfg.model, len(CLASSES))
    save_checkpoint(tmp_path / "teacher", model, {"config": tcfg.to_dict(), "class_names": list(CLASSES)})
    sets = ["train.epochs=1", "train.progress=false", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}"]
    sets.append("distill.method=clockdistill")
    proc = run_cli("distill", "--teacher", str(tmp_path / "teacher"), *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1 :])
    assert summary["method"] == "clockdistill" and 0 <= summary["best_AP"] <= 1
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert meta["config"]["model"]["preset"] == "dfine-tiny-student" and meta["config"]["loss"]["cls_loss"] == "vfl"


def test_an_original_dfine_checkpoint_imports(tmp_path):
    """A checkpoint of Peterande/D-FINE's trainer ({"ema": {"module": state}}) under the reference's names,
    whose key/shape manifest the parity benchmark recorded from the reference's own model
    (tests/bench/parity_dfine.py), imports with every size read off the tensors, the query count and
    sampling method asked for in one line, and gives our model's outputs exactly."""
    import json
    from pathlib import Path

    from clockdistill.errors import UserError

    manifest = json.loads((Path(__file__).parent / "data" / "dfine_reference_keys.json").read_text())
    cfg = resolve_config({"model": {"preset": manifest["preset"], **manifest["model"]}})
    torch.manual_seed(0)
    ours = build_detector(cfg.model, 3).eval()
    with torch.no_grad():
        for name, t in ours.state_dict().items():
            if t.is_floating_point() and not name.endswith(("num_points_scale", "decoder.up", "reg_scale")):
                t.add_(torch.randn_like(t) * 0.05)
    state = dict(ours.state_dict())
    state.update({f"decoder.decoder.{k}": state[f"decoder.{k}"].clone() for k in ("up", "reg_scale")})
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    state.update({"decoder.anchors": torch.zeros(1, 8400, 4), "decoder.valid_mask": torch.ones(1, 8400, 1)})
    torch.save({"ema": {"module": state, "updates": 100}, "last_epoch": 3}, tmp_path / "dfine.pth")
    with pytest.raises(UserError, match=r"model\.num_queries, model\.cross_attn_method; give them with --set"):
        import_checkpoint(tmp_path / "dfine.pth", tmp_path / "refused")
    sets = ["model.num_queries=20", "model.cross_attn_method=default"]
    meta = import_checkpoint(tmp_path / "dfine.pth", tmp_path / "ck", overrides=sets)
    m = meta["config"]["model"]
    want = dict(hgnet="B0", backbone_width=1.0, use_lab=True, num_levels=3, level_points=[3, 6, 3], nheads=4)
    want.update(d_model=64, ffn_dim=128, encoder_ffn_dim=128, dec_layers=3, reg_max=32, reg_scale=4.0)
    assert {k: m[k] for k in want} == want and m["preset"] == "dfine-s"
    loaded, _ = load_detector(tmp_path / "ck")
    loaded.eval()
    images, mask = torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        a, b = ours(images, mask), loaded(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
