"""DINO: its decoder (look forward twice, checked with autograd; denoising queries isolated from the
matching queries by the attention mask), the detector (initialisation and size as the reference,
mixed query selection, denoising only in training, the criterion's terms), and CLoCKDistill on it
(the target-aware queries stay out of the student's denoising machinery)."""

import copy
import json
import math
import pathlib

import pytest
import torch
from torch import nn

from clockdistill.config.layers import resolve_config
from clockdistill.losses.criterion import SetCriterion, model_detection_weights, weighted_sum
from clockdistill.models.build import build_detector
from clockdistill.models.common import MLP, Memory
from clockdistill.models.denoising import contrastive_denoising_queries
from clockdistill.models.dino import DinoDecoder, look_forward_twice

D, LEVELS, LAYERS = 32, 2, 3


def _memory(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 8), (3, 4)]
    n = sum(h * w for h, w in shapes)
    return Memory(
        memory=torch.randn(batch, n, D, generator=g),
        pos=torch.randn(batch, n, D, generator=g),
        padding_mask=torch.zeros(batch, n, dtype=torch.bool),
        spatial_shapes=shapes,
        valid_ratios=torch.ones(batch, LEVELS, 2),
    )


def _decoder_and_heads(seed=0):
    torch.manual_seed(seed)
    decoder = DinoDecoder(D, 64, 0.0, LEVELS, 4, 2, LAYERS).eval()
    head = MLP(D, D, 4, 3)
    nn.init.normal_(head.layers[-1].weight, std=0.1)  # not DINO's zero init: every head must move the box
    box_heads = [copy.deepcopy(head) for _ in range(LAYERS)]  # one per layer, so gradients can be told apart
    class_heads = [nn.Linear(D, 5) for _ in range(LAYERS)]
    return decoder, box_heads, class_heads


def test_a_layers_box_loss_reaches_the_previous_layers_box_head_and_no_further():
    decoder, box_heads, class_heads = _decoder_and_heads()
    g = torch.Generator().manual_seed(1)
    content, reference = torch.randn(2, 7, D, generator=g), 0.2 + 0.6 * torch.rand(2, 7, 4, generator=g)
    hidden, refs = decoder(content, reference, _memory(), box_heads)
    _, boxes = look_forward_twice(hidden, refs, class_heads, box_heads)
    assert len(boxes) == LAYERS and len(refs) == LAYERS + 1

    def grads_of(loss):
        for p in [*decoder.parameters(), *(p for h in box_heads for p in h.parameters())]:
            p.grad = None
        loss.backward(retain_graph=True)
        return [
            sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in h.parameters()) for h in box_heads
        ]

    last = grads_of(boxes[2].sum())
    assert last[2] > 0 and last[1] > 0  # its own head, and (looking forward twice) layer 1's head
    assert last[0] == 0.0  # layer 1 got layer 0's box detached: no path further back
    middle = grads_of(boxes[1].sum())
    assert middle[1] > 0 and middle[0] > 0 and middle[2] == 0.0
    # the next layer's input is the detached box: the references a layer attends with carry no gradient
    assert not refs[0].requires_grad and all(r.requires_grad for r in refs[1:])


def test_denoising_queries_never_change_the_matching_queries_outputs():
    decoder, box_heads, class_heads = _decoder_and_heads(seed=2)
    g = torch.Generator().manual_seed(3)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    nq = 5
    dn = contrastive_denoising_queries(targets, nn.Embedding(5, D), nq, 4, dn_number=2, generator=g)
    content, reference = torch.randn(2, nq, D, generator=g), 0.2 + 0.6 * torch.rand(2, nq, 4, generator=g)
    mem = _memory()
    with torch.no_grad():
        alone, _ = decoder(content, reference, mem, box_heads)
        both, _ = decoder(
            torch.cat([dn.content, content], 1),
            torch.cat([dn.reference.sigmoid(), reference], 1),
            mem,
            box_heads,
            attn_mask=dn.attn_mask,
        )
        unmasked, _ = decoder(
            torch.cat([dn.content, content], 1), torch.cat([dn.reference.sigmoid(), reference], 1), mem, box_heads
        )
    pad = dn.pad_size
    assert torch.allclose(both[-1][:, pad:], alone[-1], atol=1e-5)
    assert not torch.allclose(unmasked[-1][:, pad:], alone[-1], atol=1e-3)  # without the mask they would leak


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True  # the second image is narrower
    targets = [
        {
            "size": torch.tensor([96, 128]),
            "labels": torch.tensor([1, 2, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.5, 0.1, 0.1]]),
        },
        {"size": torch.tensor([96, 96]), "labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3]])},
    ]
    return images, mask, targets


def _dino(preset="dino-tiny-teacher", classes=5, **fields):
    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": preset, **fields}})
    return build_detector(cfg.model, classes), cfg


def test_dino_starts_as_the_reference_does_and_has_its_size():
    m, cfg = _dino("dino-r50", 91)
    assert cfg.model.num_queries == 900 and cfg.model.dn_number == 100 and cfg.loss.cls == 1.0
    assert (cfg.model.dn_box_noise, cfg.model.dn_label_noise) == (0.4, 0.5)
    # DINO-4scale R50: 47M parameters in the paper (46.9M with 91 classes)
    assert 46.5e6 < sum(p.numel() for p in m.parameters()) < 47.5e6
    prior = -math.log((1 - 0.01) / 0.01)
    for head in (m.class_embed, m.enc_out_class_embed):
        assert torch.allclose(head.bias, torch.full_like(head.bias, prior))
    for box in (m.bbox_embed, m.enc_out_bbox_embed):
        assert not box.layers[-1].weight.any() and not box.layers[-1].bias.any()
    assert m.enc_out_class_embed is not m.class_embed  # the two-stage heads are separate copies
    assert 0.85 < m.level_embed.std().item() < 1.15 and 0.85 < m.label_enc.weight.std().item() < 1.15
    bound = math.sqrt(6 / (900 + 256))  # tgt_embed: xavier (the transformer's reset overrides N(0, 1))
    assert m.tgt_embed.weight.abs().max() <= bound and m.tgt_embed.weight.std() > bound / 3
    assert m.label_enc.num_embeddings == 92  # the label book: num_classes + 1
    assert not any(p.requires_grad for n, p in m.backbone.named_parameters() if n.startswith(("conv1", "layer1")))
    five, _ = _dino("dino-r50-5scale", 91)  # C2-C5 and one strided level: one more input projection
    assert len(five.input_proj) == 5 and five.input_proj[0][0].in_channels == 256
    # the student preset distils into: same architecture on ResNet-18
    s, scfg = _dino("dino-r18", 91)
    assert scfg.model.arch == "dino" and sum(p.numel() for p in s.parameters()) < 0.75 * 46.9e6


def test_mixed_query_selection_takes_detached_anchors_of_the_best_proposals_and_learned_content():
    m, _ = _dino()
    images, mask, _ = _batch()
    m.eval()
    mem = m.encode(images, mask)
    q = m.default_queries(mem)
    K = m.cfg.num_queries
    assert torch.equal(q.content[0], m.tgt_embed.weight) and torch.equal(q.content[1], m.tgt_embed.weight)
    assert not q.reference.requires_grad and q.reference.shape == (2, K, 4)
    interm = q.outputs["interm_outputs"]
    assert interm["pred_boxes"].requires_grad and torch.allclose(interm["pred_boxes"], q.reference)
    # the anchors are the proposals with the highest best-class logit, image by image
    out_mem, proposals = m._proposals(mem)
    scores = m.enc_out_class_embed(out_mem).max(-1)[0]
    for b in range(2):
        assert torch.allclose(interm["pred_logits"][b].max(-1)[0].sort().values, scores[b].topk(K).values.sort().values)


def test_denoising_runs_in_training_only_and_leaves_the_matching_queries_outputs_as_they_are():
    m, cfg = _dino()
    images, mask, targets = _batch()
    m.eval()  # BatchNorm on running statistics: both passes see the same normalisation
    m.training = True  # ... while the detector itself is in training
    plain = m(images, mask)
    torch.manual_seed(1)
    noised = m(images, mask, targets=targets)
    assert "dn" not in plain and "dn" in noised
    assert torch.allclose(plain["pred_logits"], noised["pred_logits"], atol=1e-5)
    assert torch.allclose(plain["pred_boxes"], noised["pred_boxes"], atol=1e-6)
    dn = noised["dn"]
    groups = 2 * cfg.model.dn_number  # budget below 100: the group count
    assert dn["groups"] == groups and dn["outputs"]["pred_logits"].shape[1] == 2 * groups * 3  # max 3 boxes
    assert len(dn["outputs"]["aux_outputs"]) == cfg.model.dec_layers - 1
    pos, gt = dn["indices"][1]
    assert len(pos) == groups and torch.equal(gt, torch.zeros(groups, dtype=torch.long))
    m.train(False)
    assert "dn" not in m(images, mask, targets=targets)  # evaluation: no denoising queries


def test_the_criterion_supervises_denoising_and_the_selected_proposals_with_real_labels():
    m, cfg = _dino()
    images, mask, targets = _batch()
    m.train()
    out = m(images, mask, targets=targets)
    crit, weights = SetCriterion.from_config(cfg.loss, 5), model_detection_weights(cfg.loss, cfg.model)
    terms = crit(out, targets)
    for suffix in ("", "_0", "_dn", "_dn_0", "_interm"):
        assert {f"loss_cls{suffix}", f"loss_bbox{suffix}", f"loss_giou{suffix}"} <= terms.keys(), suffix
    assert set(terms) == set(weights) and weights["loss_cls"] == 1.0 and weights["loss_bbox_interm"] == 5.0
    relabelled = [{**t, "labels": (t["labels"] + 1) % 5} for t in targets]
    assert crit(out, relabelled)["loss_cls_interm"] != terms["loss_cls_interm"]  # classes, not objectness
    weighted_sum(terms, weights).backward()
    assert m.label_enc.weight.grad is not None and m.label_enc.weight.grad.abs().sum() > 0
    assert m.tgt_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["clockdistill", "logit_only"])
def test_target_aware_queries_use_the_frozen_table_and_add_nothing_to_the_students_denoising(method):
    from clockdistill.distill.distiller import Distiller
    from clockdistill.distill.teacher import FrozenTeacher

    images, mask, targets = _batch()
    teacher, _ = _dino("dino-tiny-teacher", 4)
    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": "dino-tiny-student"}, "distill": {"method": method}})
    student = build_detector(cfg.model, 4)
    targets = [{**t, "labels": t["labels"] % 4} for t in targets]
    d = Distiller(FrozenTeacher(teacher), student, cfg)
    results = {}
    for fused in (True, False):
        d.fuse_decoder = fused
        student.zero_grad()
        torch.manual_seed(3)  # the same denoising noise in both passes
        terms, weights = d.losses(images, mask, targets)
        kd = [k for k in terms if k.startswith("kd_cls") or k.startswith("kd_box")]
        assert kd and {"loss_cls_dn", "loss_cls_interm"} <= terms.keys()
        sum(weights[k] * terms[k] for k in kd).backward(retain_graph=True)
        # the target-aware queries never touch the student's trainable label book
        assert student.label_enc.weight.grad is None or not student.label_enc.weight.grad.any()
        results[fused] = {k: v.item() for k, v in terms.items()}
    # the denoising loss is the same whether or not target-aware queries share the decoder pass
    for k in results[True]:
        assert abs(results[True][k] - results[False][k]) <= 1e-4 * abs(results[True][k]) + 1e-6, k


def test_every_method_trains_a_dino_student_from_a_dino_teacher():
    from clockdistill.config.methods import METHODS
    from clockdistill.distill.distiller import Distiller
    from clockdistill.distill.teacher import FrozenTeacher

    images, mask, targets = _batch()
    targets = [{**t, "labels": t["labels"] % 4} for t in targets]
    teacher, _ = _dino("dino-tiny-teacher", 4)
    for method in METHODS:
        torch.manual_seed(0)
        cfg = resolve_config({"model": {"preset": "dino-tiny-student"}, "distill": {"method": method}})
        d = Distiller(FrozenTeacher(teacher), build_detector(cfg.model, 4), cfg)
        d.model.train()
        terms, weights = d.losses(images, mask, targets)
        kd = [k for k in terms if k.startswith("kd_")]
        assert bool(kd) == (method != "none") and "loss_cls_dn" in terms, method
        loss = weighted_sum(terms, weights)
        assert torch.isfinite(loss), method
        loss.backward()
        assert d.model.class_embed.weight.grad.abs().sum() > 0, method


def test_cli_distills_a_dino_teacher_into_the_dino_student(synth_data, tmp_path):
    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.data.synth import CLASSES
    from conftest import run_cli

    teacher, tcfg = _dino("dino-tiny-teacher", len(CLASSES), num_classes=len(CLASSES))
    tcfg = tcfg.updated({"data.root": str(synth_data)})
    save_checkpoint(tmp_path / "teacher", teacher, {"config": tcfg.to_dict(), "class_names": list(CLASSES)})
    sets = ["train.epochs=1", "train.progress=false", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}"]
    proc = run_cli("distill", "--teacher", str(tmp_path / "teacher"), *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1 :])
    assert summary["method"] == "clockdistill" and 0 <= summary["best_AP"] <= 1
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert meta["config"]["model"]["preset"] == "dino-tiny-student" and meta["config"]["loss"]["cls"] == 1.0


@pytest.mark.parametrize(
    "preset,with_args",
    [("dino-r50", True), ("dino-r50", False), ("dino-r50-5scale", False)],
    ids=["with-args", "weights-only", "5scale-weights-only"],
)
def test_an_original_dino_checkpoint_imports_with_every_key_accounted_for(preset, with_args, tmp_path):
    """The reference model's key/shape manifest (tests/data, written by tests/bench/parity_reference.py
    from IDEA-Research/DINO's own code, 4-scale) is what our original-layout writer produces, and such
    a checkpoint imports into the same detector: no key missing or left over, the same outputs. A
    5-scale checkpoint (C2-C5) is told apart by its input projections."""
    from reference_layout import original_layout, perturb, reference_args

    from clockdistill.checkpoint import load_detector
    from clockdistill.weights.importer import import_checkpoint

    manifest = json.loads((pathlib.Path(__file__).parent / "data" / "dino_reference_keys.json").read_text())
    fields = {k: v for k, v in manifest["model"].items() if k != "preset"}
    source, cfg = _dino(preset, manifest["num_classes"], **fields)
    perturb(source)
    source.eval()
    cfg = cfg.updated({"model.num_classes": manifest["num_classes"]})
    state = original_layout(source.state_dict(), cfg.to_dict())
    if preset == manifest["model"]["preset"]:
        assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    checkpoint = {"model": state, "epoch": 11, **({"args": reference_args(cfg.to_dict())} if with_args else {})}
    torch.save(checkpoint, tmp_path / "checkpoint0011_4scale.pth")
    given = [] if with_args else ["model.n_points=4", "model.dilation=false"]  # what no tensor tells
    meta = import_checkpoint(tmp_path / "checkpoint0011_4scale.pth", tmp_path / "ours", overrides=given)
    assert meta["imported_from"]["tensors"] < len(state)  # the shared heads' copies folded into one
    imported, meta = load_detector(tmp_path / "ours")
    model = meta["config"]["model"]
    assert model["arch"] == "dino" and model["preset"] == preset and model["dn_labelbook"] == 4
    assert model["num_levels"] == (5 if preset.endswith("5scale") else 4)
    assert (model["d_model"], model["nheads"], model["num_queries"]) == (64, 4, 20)
    assert (model["dn_number"] == 3) == with_args  # only the args say the denoising budget (default 100)
    images, mask, _ = _batch()
    with torch.no_grad():
        a, b = source(images, mask), imported(images, mask)
    for x, y in zip([*a["aux_outputs"], a], [*b["aux_outputs"], b]):
        assert torch.equal(x["pred_logits"], y["pred_logits"]) and torch.equal(x["pred_boxes"], y["pred_boxes"])
    assert torch.equal(imported.label_enc.weight, source.label_enc.weight)


def test_a_dino_checkpoint_with_per_layer_heads_is_refused_with_one_line(tmp_path):
    from reference_layout import original_layout

    from clockdistill.errors import UserError
    from clockdistill.weights.importer import import_checkpoint

    m, cfg = _dino("dino-tiny-teacher", 4, num_classes=4, backbone_norm="frozen")
    state = original_layout(m.state_dict(), cfg.to_dict())
    state["class_embed.1.bias"] = state["class_embed.1.bias"] + 1  # untied heads: not the published DINO
    torch.save({"model": state}, tmp_path / "untied.pth")
    with pytest.raises(UserError, match="class_embed.1.bias differs"):
        import_checkpoint(
            tmp_path / "untied.pth", tmp_path / "out", overrides=["model.nheads=4", "model.dilation=false"]
        )
    assert not (tmp_path / "out").exists()
