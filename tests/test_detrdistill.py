"""DETRDistill (distill.method=detrdistill): its three parts each switchable, the target-aware feature
mask on a hand-built case, the query-prior part against the teacher's own detection loss, where the
gradients go, and the one-line errors."""

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.distill.cache import cache_blockers
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.losses import feature_term, target_aware_mask
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.errors import ConfigError
from clockdistill.models.build import build_detector
from clockdistill.models.common import decoder_layers


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    targets = [
        {
            "size": torch.tensor([96, 128]),
            "labels": torch.tensor([1, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]),
        },
        {"size": torch.tensor([96, 96]), "labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3]])},
    ]
    return images, mask, targets


def _distiller(student="hybrid-tiny-student", teacher=None, padding="invariant", **parts):
    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": student.replace("student", "teacher")}})
    teacher = teacher or FrozenTeacher(build_detector(tcfg.model, 4), padding=padding)
    cfg = resolve_config({"model": {"preset": student}, "distill": {"method": "detrdistill", "detrdistill": parts}})
    return Distiller(teacher, build_detector(cfg.model, 4), cfg)


@pytest.mark.parametrize("off", ["logits", "feature", "query_prior"])
def test_each_part_has_its_own_switch(off):
    images, mask, targets = _batch()
    full, _ = _distiller().losses(images, mask, targets)
    d = _distiller(**{off: False})
    terms, weights = d.losses(images, mask, targets)
    prefix = {"logits": "kd_cls_", "feature": "kd_feat", "query_prior": "kd_qp_"}
    for part, p in prefix.items():
        present = any(k.startswith(p) for k in terms)
        assert present == (part != off) and any(k.startswith(p) for k in full), (off, part)
    assert {k for k in terms if k.startswith("kd_")} == {k for k in weights if k.startswith("kd_")}
    assert ("kd_feat" in d.formula()) == (off != "feature")


def test_all_parts_off_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="distill.detrdistill: every part is switched off"):
        resolve_config(
            {
                "distill": {
                    "method": "detrdistill",
                    "detrdistill": {"logits": False, "feature": False, "query_prior": False},
                }
            }
        )


def test_the_feature_mask_follows_the_teachers_confident_queries():
    """One confident query (score s, its box on the GT) whose embedding points along token 0 and away
    from token 1: the mask is s there and the floor 0.01 elsewhere, so an error on token 0 costs
    10^4 times one on token 1."""
    d = 4
    hidden = torch.zeros(1, 2, d)
    hidden[0, 0, 0] = 1.0  # query 0 along channel 0
    hidden[0, 1, 1] = 1.0  # query 1 along channel 1, but scored low and off every box
    logits = torch.tensor([[[2.0], [-8.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    layer = {"pred_logits": logits, "pred_boxes": boxes, "hidden": hidden}
    feats = torch.zeros(1, 2, d)
    feats[0, 0, 0] = 3.0  # token 0 along query 0
    feats[0, 1, 2] = 5.0  # token 1 orthogonal to both queries
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    mask = target_aware_mask(layer, feats, targets, top_k=1)
    assert torch.allclose(mask, torch.tensor([[torch.sigmoid(torch.tensor(2.0)).item(), 0.01]]), atol=1e-6)
    pad = torch.zeros(1, 2, dtype=torch.bool)
    student = feats.clone()
    student[0, 0, 3] = 1.0
    on_object = feature_term([layer], feats, student, pad, [(1, 2)], targets, 1)
    student = feats.clone()
    student[0, 1, 3] = 1.0
    off_object = feature_term([layer], feats, student, pad, [(1, 2)], targets, 1)
    m0 = mask[0, 0] / mask[0, 0]  # over the level's max: 1 on token 0
    m1 = mask[0, 1] / mask[0, 0]
    assert torch.isclose(on_object, m0**2 / (2 * d)) and torch.isclose(off_object, m1**2 / (2 * d))
    assert feature_term([layer], feats, feats, pad, [(1, 2)], targets, 1) == 0


def test_the_feature_term_pulls_the_students_encoder_input_and_nothing_of_the_teacher():
    images, mask, targets = _batch()
    d = _distiller(logits=False, query_prior=False)
    terms, _ = d.losses(images, mask, targets)
    terms["kd_feat"].backward()
    grads = {n for n, p in d.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("input_proj.") for n in grads) and any(n.startswith("backbone.") for n in grads)
    assert not any(n.startswith(("encoder.", "decoder.")) for n in grads)  # the tokens are the encoder's input
    assert all(p.grad is None for p in d.teacher.parameters())


@pytest.mark.parametrize("student", ["hybrid-tiny-student", "dino-tiny-student"])
def test_query_prior_of_an_identical_student_is_the_teachers_own_detection_loss(student):
    """The student is the teacher: decoding the teacher's queries gives the teacher's outputs, and the
    teacher's assignment is then the Hungarian matching of those outputs, so every kd_qp term equals
    the teacher's own detection term of that layer."""
    images, mask, targets = _batch()
    # the reference's numbers on this padded batch, as the student computes them
    d = _distiller(student.replace("student", "teacher"), padding="reference", logits=False, feature=False)
    d.model.load_state_dict(d.teacher.detector.state_dict())
    d.model.eval()
    terms, _ = d.losses(images, mask, targets)
    with torch.no_grad():
        layers_t = decoder_layers(d.teacher.predict_default(d.teacher.encode(images, mask)))
    for e, layer in enumerate(layers_t):
        own = d.criterion.layer_losses(layer, targets, 3.0)
        for k in ("cls", "bbox", "giou"):
            assert torch.isclose(terms[f"kd_qp_{k}_{e}"], own[f"loss_{k}"], rtol=1e-4, atol=1e-6), (e, k)


def test_the_query_prior_needs_the_teachers_family_and_width_and_the_cache_is_refused():
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_detector(resolve_config({"model": {"preset": "hybrid-tiny-teacher"}}).model, 4))
    cfg = resolve_config(
        {"model": {"preset": "hybrid-tiny-student", "d_model": 32}, "distill": {"method": "detrdistill"}}
    )
    with pytest.raises(ConfigError, match="distill.detrdistill.query_prior"):
        Distiller(teacher, build_detector(cfg.model, 4), cfg)
    ok = cfg.updated({"distill.detrdistill.query_prior": False})
    d = Distiller(teacher, build_detector(ok.model, 4), ok)  # the feature part adapts the width
    assert d.adapter is not None and d.adapter.in_features == 32
    assert any("detrdistill" in r for r in cache_blockers(cfg))
    only_logits = cfg.updated({"distill.detrdistill.feature": False, "distill.detrdistill.query_prior": False})
    assert not any("detrdistill" in r for r in cache_blockers(only_logits))
