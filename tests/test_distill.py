"""The Distiller: frozen teacher, gradient flow, zero loss for identical models, every method, the CLI."""

import json

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.config.methods import METHODS
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.transforms import DetectionTransform, collate
from clockdistill.distill.distiller import Distiller, layer_pairs
from clockdistill.distill.run import run_distillation
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.errors import ConfigError
from clockdistill.models.build import build_detector
from conftest import run_cli


@pytest.fixture(scope="module")
def batch(synth_data):
    ds = CocoDetection(synth_data, "train", DetectionTransform(96, train=False))
    return collate([ds[i] for i in range(4)])


def _distiller(
    method="clockdistill", teacher=None, student_preset="hybrid-tiny-student", padding="invariant", **distill
):
    """A distiller of a fresh student and (unless given) a fresh teacher of the student's family."""
    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": student_preset}, "distill": {"method": method, **distill}})
    teacher_preset = student_preset.replace("student", "teacher")
    detector = build_detector(resolve_config({"model": {"preset": teacher_preset}}).model, 4)
    teacher = teacher or FrozenTeacher(detector, padding=padding)
    return Distiller(teacher, build_detector(cfg.model, 4), cfg)


TEACHERS = [
    "hybrid-tiny-teacher",
    "deformable-detr-tiny-teacher",
    "deformable-detr-tiny-teacher-refine",
    "deformable-detr-tiny-teacher-two-stage",
    "dab-detr-tiny-teacher",
    "dino-tiny-teacher",
]


def test_frozen_teacher_stays_in_eval_and_out_of_the_graph(batch):
    teacher = FrozenTeacher(build_detector(resolve_config({}).model, 4))
    parent = torch.nn.Sequential(teacher)
    parent.train()
    teacher.train(True)
    assert not teacher.training and not teacher.detector.training
    assert all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(batch[0], batch[1])
    assert not out["pred_logits"].requires_grad


@pytest.mark.parametrize("preset", TEACHERS)
def test_identical_teacher_and_student_give_zero_distillation_loss(batch, preset):
    images, mask, targets = batch
    for method in ("clockdistill", "vanilla_kd", "fitnet"):
        # the reference's numbers on this padded batch, as the student computes them (an invariant
        # teacher differs from its own weights there: tests/test_padding_invariance.py)
        d = _distiller(method, student_preset=preset, padding="reference", logit={"random_queries": 6, "groups": 2})
        d.model.load_state_dict(d.teacher.detector.state_dict())
        d.model.eval()  # BatchNorm in train mode would use batch statistics, the teacher its running ones
        terms, weights = d.losses(images, mask, targets)
        kd = {k: v.item() for k, v in terms.items() if k.startswith("kd_")}
        assert kd and all(abs(v) < 1e-4 for v in kd.values()), (method, kd)
        assert set(terms) == {k for k in weights if "_dn" not in k}  # DINO denoises in training only
    # ...and a different student does not (the test above could not pass on a constant zero).
    d = _distiller("clockdistill", student_preset=preset, logit={"random_queries": 6})
    d.model.eval()
    terms, _ = d.losses(images, mask, targets)
    assert terms["kd_mem_fg"].item() > 1 and terms["kd_cls_2"].item() > 1e-3


def test_a_training_step_changes_only_the_student(batch):
    images, mask, targets = batch
    d = _distiller("clockdistill", logit={"random_queries": 4}, memory={"weight": 100.0})
    d.model.train()
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    tables_before = {k: v.clone() for k, v in d.queries.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.model.state_dict().items()}
    named = d.parameters_to_train()
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in d.teacher.parameters()}
    assert not in_optimizer & {id(p) for p in d.queries.parameters()}

    terms, weights = d.losses(images, mask, targets)
    loss = sum(weights[k] * v for k, v in terms.items())
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.queries.parameters())
    with_grad = [n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("encoder.") for n in with_grad) and any(n.startswith("decoder.") for n in with_grad)
    assert any(n.startswith("backbone.") for n in with_grad)
    opt.step()

    assert not d.teacher.training
    for k, v in d.teacher.state_dict().items():  # weights and BatchNorm buffers
        assert torch.equal(v, teacher_before[k]), k
    for k, v in d.queries.state_dict().items():
        assert torch.equal(v, tables_before[k]), k
    changed = [k for k, v in d.model.state_dict().items() if not torch.equal(v, student_before[k])]
    assert len(changed) > len(student_before) // 2


def test_memory_and_logit_gradients_flow_into_the_student_separately(batch):
    images, mask, targets = batch
    d = _distiller("memory_only")
    terms, _ = d.losses(images, mask, targets)
    terms["kd_mem_fg"].backward()
    grads = {n for n, p in d.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("encoder.") for n in grads) and not any(n.startswith("decoder.") for n in grads)

    d = _distiller("logit_only")
    terms, _ = d.losses(images, mask, targets)
    terms["kd_cls_2"].backward()
    grads = {n for n, p in d.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("class_heads.2") for n in grads) and any(n.startswith("encoder.") for n in grads)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_its_loss_falls_on_one_batch(batch, tiny_teacher, method):
    images, mask, targets = (x[:2] for x in batch)
    # A trained teacher (a random one agrees with a fresh student on boxes: nothing to learn), and
    # memory weights raised so that the memory term is not swamped by the detection terms here.
    d = _distiller(
        method, teacher=FrozenTeacher.load(tiny_teacher), memory={"alpha": 5e-3, "beta": 1e-5, "fitnet_weight": 10.0}
    )
    kd_keys = [k for k in d.weights if k.startswith("kd_")]
    assert (method == "none") == (not kd_keys)
    opt = torch.optim.AdamW([p for _, p in d.parameters_to_train()], lr=1e-3)
    history = []
    for _ in range(20):  # descend the method's own loss (the detection loss for "none")
        terms, weights = d.losses(images, mask, targets)
        loss = sum(weights[k] * terms[k] for k in kd_keys or terms)
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.9 * history[0], (method, history[0], history[-1])


def test_empty_ground_truth_batch_gives_finite_zero_logit_terms(batch):
    images, mask, targets = batch
    empty = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0]} for t in targets]
    d = _distiller("clockdistill")
    terms, _ = d.losses(images, mask, empty)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["kd_cls_0"].item() == 0 and terms["kd_mem_fg"].item() == 0 and terms["kd_mem_bg"].item() > 0
    d = _distiller("clockdistill", logit={"random_queries": 5})  # random queries still distil
    mixed = [empty[0], *targets[1:]]
    terms, _ = d.losses(images, mask, mixed)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["kd_cls_0"].item() > 0


def test_layer_pairs_align_from_the_last_layer():
    assert layer_pairs("all", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs("all", 3, 6) == [(0, 3), (1, 4), (2, 5)]
    assert layer_pairs("last", 3, 6) == [(2, 5)]
    assert layer_pairs("last2", 6, 6) == [(4, 4), (5, 5)]
    assert layer_pairs("0,2", 3, 3) == [(0, 0), (2, 2)]
    with pytest.raises(ConfigError, match="distill.logit.layers"):
        layer_pairs("5", 3, 3)


def test_student_of_another_width_gets_an_adapter_and_mismatched_levels_are_refused(batch):
    d = _distiller("clockdistill", student_preset="hybrid-tiny-student")
    assert d.adapter is None
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student", "d_model": 32}})
    teacher = FrozenTeacher(build_detector(resolve_config({}).model, 4))
    d = Distiller(teacher, build_detector(cfg.model, 4), cfg)
    assert d.adapter is not None and d.adapter.in_features == 32 and d.adapter.out_features == 64
    assert any(n.startswith("adapter.") for n, _ in d.parameters_to_train())
    terms, _ = d.losses(*batch)
    assert torch.isfinite(terms["kd_mem_fg"]) and torch.isfinite(terms["kd_cls_0"])
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student", "num_levels": 2}})
    with pytest.raises(ConfigError, match="model.num_levels"):
        Distiller(teacher, build_detector(cfg.model, 4), cfg)
    cfg = resolve_config(
        {"model": {"preset": "hybrid-tiny-student", "num_levels": 2}, "distill": {"method": "logit_only"}}
    )
    Distiller(teacher, build_detector(cfg.model, 4), cfg)  # logits need no memory alignment


def test_formula_names_every_weighted_term():
    d = _distiller("clockdistill", memory={"alpha": 2e-4}, logit={"layers": "last"})
    text = d.formula()
    assert "0.0002*kd_mem_fg" in text and "1e-07*kd_mem_bg" in text and "{2}" in text and "T=10" in text
    assert "kd_cls_2" in d.weights and "kd_cls_0" not in d.weights


def test_distill_config_takes_data_and_student_preset_from_the_teacher(tiny_teacher, synth_data):
    cfg = resolve_config(overrides=["distill.memory.alpha=1e-4", "train.epochs=1"], distill=True, teacher=tiny_teacher)
    assert cfg.data.root == str(synth_data) and cfg.model.preset == "hybrid-tiny-student"
    assert cfg.distill.memory.alpha == 1e-4 and cfg.distill.teacher == str(tiny_teacher)
    with pytest.raises(ConfigError, match="distill.teacher"):
        resolve_config(distill=True)
    with pytest.raises(ConfigError, match="distill.method"):
        resolve_config(overrides=["distill.method=kd"], distill=True, teacher=tiny_teacher)


def test_run_distillation_reports_map_and_every_loss_term(tiny_teacher, tmp_path):
    cfg = resolve_config(
        distill=True,
        overrides=[
            "train.epochs=2",
            "train.batch_size=8",
            "train.progress=false",
            "train.device=cpu",
            f"train.output_dir={tmp_path / 'kd'}",
            "distill.logit.random_queries=3",
        ],
        teacher=tiny_teacher,
    )
    seen = []
    result = run_distillation(cfg, on_epoch_end=lambda e, m, ckpt: seen.append((e, dict(m), ckpt)))
    assert [e for e, _, _ in seen] == [1, 2]
    metrics = seen[-1][1]
    for key in (
        "AP",
        "AP50",
        "AP75",
        "APs",
        "loss",
        "loss_cls",
        "kd_mem_fg",
        "kd_mem_bg",
        "kd_cls_0",
        "kd_l1_2",
        "kd_giou_1",
        "loss_det",
        "loss_kd_mem",
        "loss_kd_logit",
        "teacher_AP",
    ):
        assert key in metrics, key
    assert metrics["loss"] == pytest.approx(
        metrics["loss_det"] + metrics["loss_kd_mem"] + metrics["loss_kd_logit"], rel=1e-4
    )
    assert result.teacher_ap == metrics["teacher_AP"] and "kd_mem_fg" in result.formula
    assert (seen[-1][2] / "model.safetensors").is_file()


def test_adapter_is_checkpointed_and_restored(tiny_teacher, tmp_path):
    from clockdistill.checkpoint import load_extra

    overrides = [
        "train.epochs=1",
        "train.progress=false",
        "train.device=cpu",
        f"train.output_dir={tmp_path}",
        "model.d_model=32",
        "model.ffn_dim=64",
    ]
    cfg = resolve_config(overrides=overrides, distill=True, teacher=tiny_teacher)
    run_distillation(cfg)
    assert (tmp_path / "last" / "extra.safetensors").is_file()
    adapter = torch.nn.Linear(32, 64)
    before = adapter.weight.clone()
    load_extra(tmp_path / "last", {"adapter": adapter})
    assert not torch.equal(adapter.weight, before)
    cfg = resolve_config(overrides=overrides[1:] + ["train.epochs=2"], distill=True, teacher=tiny_teacher)
    result = run_distillation(cfg)  # resumes from last, adapter included
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_cli_distill_prints_formula_epochs_and_summary(tiny_teacher, tmp_path):
    proc = run_cli(
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--set",
        "train.epochs=1",
        "--set",
        "train.progress=false",
        "--set",
        "train.device=cpu",
        "--set",
        f"train.output_dir={tmp_path}",
        "--set",
        "distill.method=vanilla_kd",
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss (vanilla_kd) = L_det" in proc.stdout and "epoch 1/1: AP" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1 :])
    assert summary["method"] == "vanilla_kd" and 0 <= summary["best_AP"] <= 1 and summary["teacher_AP"] is not None


@pytest.mark.parametrize(
    "override,field",
    [
        ("distill.method=fitnets", "distill.method"),
        ("distill.logit.temperature=-1", "distill.logit.temperature"),
        ("distill.memory.alpha='5e-5'", "distill.memory.alpha"),
        ("distill.memory.beta=-1e-7", "distill.memory.beta"),
        ("distill.logit.layers=first", "distill.logit.layers"),
        ("distill.bogus=1", "distill.bogus"),
    ],
)
def test_cli_distill_rejects_bad_values_with_one_line(tiny_teacher, override, field):
    proc = run_cli("distill", "--teacher", str(tiny_teacher), "--set", override, "--print-config")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], proc.stderr


def test_cli_distill_without_teacher_says_how_to_give_one():
    proc = run_cli("distill", "--print-config")
    assert proc.returncode == 2 and "--teacher" in proc.stderr


@pytest.mark.parametrize("student", [t.replace("teacher", "student") for t in TEACHERS])
def test_one_fused_decoder_pass_gives_the_losses_and_gradients_of_two(batch, student):
    images, mask, targets = batch
    d = _distiller("clockdistill", student_preset=student, logit={"random_queries": 3, "groups": 2})
    results = {}
    for fused in (False, True):
        d.fuse_decoder = fused
        d.model.zero_grad()
        torch.manual_seed(0)  # the same denoising noise (DINO) in both
        terms, weights = d.losses(images, mask, targets)
        sum(weights[k] * v for k, v in terms.items()).backward()
        grads = {n: p.grad.clone() for n, p in d.model.named_parameters() if p.grad is not None}
        results[fused] = ({k: v.item() for k, v in terms.items()}, grads)
    (t0, g0), (t1, g1) = results[False], results[True]
    assert t0.keys() == t1.keys() and any(k.startswith("kd_cls") for k in t0)
    for k in t0:
        assert abs(t0[k] - t1[k]) <= 1e-4 * abs(t0[k]) + 1e-6, (k, t0[k], t1[k])
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-6), n


def test_filler_query_slots_change_no_loss(batch):
    images, mask, targets = batch
    d = _distiller("clockdistill", logit={"random_queries": 2, "groups": 2})
    d.model.eval()
    plain, _ = d.losses(images, mask, targets)
    sample = d.queries.sample
    d.queries.sample = lambda t, device, min_slots=0: sample(
        t, device, min_slots=64
    )  # more slots than GT and random queries
    try:
        padded, _ = d.losses(images, mask, targets)
    finally:
        d.queries.sample = sample
    assert d.queries.sample(targets, images.device, min_slots=64).size == 64
    for k in plain:
        assert abs(plain[k].item() - padded[k].item()) <= 1e-4 * abs(plain[k].item()) + 1e-6, k
    empty = [{**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0]} for t in targets]
    assert d.queries.sample(empty, images.device, min_slots=1).size == 2  # the random queries are slots enough
    bare = _distiller("clockdistill")  # no random queries: an image share without objects gets one filler slot
    qs = bare.queries.sample(empty, images.device, min_slots=1)
    assert qs.size == 1 and not qs.valid.any()
    terms, _ = bare.losses(images, mask, empty)
    assert all(torch.isfinite(v) for v in terms.values())
