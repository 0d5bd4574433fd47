import math

import torch

from clockdistill.config.sections import LossConfig
from clockdistill.losses.criterion import SetCriterion, detection_weights, sigmoid_focal_loss, weighted_sum
from clockdistill.losses.matcher import HungarianMatcher


def make_outputs(B=3, Q=6, C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(B, Q, C, generator=gen),
        "pred_boxes": torch.rand(B, Q, 4, generator=gen) * 0.5 + 0.2,
    }


def make_targets(sizes, C=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"labels": torch.randint(0, C, (n,), generator=gen), "boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.1}
        for n in sizes
    ]


def test_matcher_batched_equals_per_image_and_handles_empty():
    outputs, targets = make_outputs(), make_targets([3, 0, 5])
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, t in enumerate(targets):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [t])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
    assert len(batched[1][0]) == 0
    assert sorted(batched[2][1].tolist()) == list(range(5))  # every target matched exactly once
    all_empty = matcher(outputs, make_targets([0, 0, 0]))
    assert all(len(src) == 0 and len(tgt) == 0 for src, tgt in all_empty)


def test_matcher_finds_the_obvious_assignment():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.1, 0.3]]])
    logits = torch.full((1, 3, 2), -4.0)
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}]
    src, tgt = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    assert dict(zip(src.tolist(), tgt.tolist())) == {0: 1, 1: 0}


def test_criterion_hand_checked_single_prediction():
    # One query, two classes, one target of class 1 whose box the prediction matches exactly.
    logits = torch.tensor([[[0.5, -1.0]]])
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    targets = [{"labels": torch.tensor([1]), "boxes": box[0].clone()}]
    crit = SetCriterion(2, HungarianMatcher(), focal_alpha=0.25, focal_gamma=2.0, aux_loss=False)
    losses = crit({"pred_logits": logits, "pred_boxes": box}, targets)
    p0, p1 = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))
    neg = 0.75 * p0**2 * -math.log(1 - p0)  # class 0 is a negative
    pos = 0.25 * (1 - p1) ** 2 * -math.log(p1)  # class 1 is the positive
    assert abs(losses["loss_cls"].item() - (neg + pos)) < 1e-6
    assert losses["loss_bbox"].item() == 0.0
    assert abs(losses["loss_giou"].item()) < 1e-6

    shifted = box + torch.tensor([0.1, 0.0, 0.0, 0.0])  # x moved by 0.1: L1 = 0.1
    losses = crit({"pred_logits": logits, "pred_boxes": shifted}, targets)
    assert abs(losses["loss_bbox"].item() - 0.1) < 1e-6
    # boxes 0.2 x 0.4 shifted by half their width: inter 0.04, union 0.12, hull 0.12 -> GIoU 1/3
    assert abs(losses["loss_giou"].item() - (1 - 1 / 3)) < 1e-5


def test_focal_loss_matches_formula():
    x, t = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    got = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    p = torch.sigmoid(x)
    want = torch.stack([0.25 * (1 - p[0]) ** 2 * -torch.log(p[0]), 0.75 * p[1] ** 2 * -torch.log(1 - p[1])])
    assert torch.allclose(got, want, atol=1e-6)


def test_aux_terms_and_weight_map():
    out = make_outputs()
    out["aux_outputs"] = [make_outputs(seed=2), make_outputs(seed=3)]
    crit = SetCriterion(4, HungarianMatcher())
    losses = crit(out, make_targets([2, 1, 0]))
    assert set(losses) == {f"{k}{s}" for k in ("loss_cls", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    weights = detection_weights(LossConfig(), num_aux=2)
    total = weighted_sum(losses, weights)
    manual = sum(weights[k] * v for k, v in losses.items())
    assert torch.allclose(total, manual)
    assert weights["loss_bbox_1"] == 5.0 and weights["loss_cls"] == 2.0


def test_criterion_with_no_targets_gives_finite_losses_and_grads():
    out = make_outputs()
    out["pred_logits"].requires_grad_(True)
    losses = SetCriterion(4, HungarianMatcher())(out, make_targets([0, 0, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_cls"].backward()
    assert out["pred_logits"].grad.abs().sum() > 0  # all queries pushed towards "no object"


def test_matcher_turns_non_finite_predictions_into_training_diverged():
    import pytest

    from clockdistill.errors import TrainingDiverged

    outputs = {"pred_logits": torch.full((1, 3, 2), float("nan")), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(TrainingDiverged, match="not finite"):
        HungarianMatcher()(outputs, targets)
