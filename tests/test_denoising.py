"""DINO's contrastive denoising queries: group count, slot layout, noise bounds, label flips and
the attention mask, against hand-built expectations."""

import torch
from torch import nn

from clockdistill.models.denoising import (
    contrastive_denoising_queries,
    denoising_attention_mask,
    denoising_groups,
    noised_boxes,
)
from clockdistill.ops.boxes import box_cxcywh_to_xyxy


def _targets(counts, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)  # away from the border: no clamping
        size = 0.05 + 0.15 * torch.rand(n, 2, generator=g)
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": torch.cat([centre, size], 1)})
    return out


def test_group_count_follows_the_reference_budget_rule():
    assert denoising_groups(100, 5) == 20  # 200 // 10
    assert denoising_groups(100, 7) == 14  # 200 // 14
    assert denoising_groups(100, 150) == 1  # 200 // 300 = 0 -> 1
    assert denoising_groups(5, 3) == 10  # below 100: 2 * dn_number groups
    assert denoising_groups(100, 0) == 1


def test_attention_mask_equals_a_hand_built_golden_mask():
    # GT counts (2, 0, 1): max_gt 2, dn_number 1 -> 2 groups of 4 slots, 3 matching queries
    q = contrastive_denoising_queries(
        _targets([2, 0, 1]), nn.Embedding(5, 8), num_queries=3, num_classes=4, dn_number=1
    )
    assert (q.groups, q.max_gt, q.pad_size) == (2, 2, 8)
    X, o = 1, 0  # X: blocked
    golden = torch.tensor(
        [
            [o, o, o, o, X, X, X, X, o, o, o],  # group 0 (slots 0-3) sees itself and the matching queries
            [o, o, o, o, X, X, X, X, o, o, o],
            [o, o, o, o, X, X, X, X, o, o, o],
            [o, o, o, o, X, X, X, X, o, o, o],
            [X, X, X, X, o, o, o, o, o, o, o],  # group 1
            [X, X, X, X, o, o, o, o, o, o, o],
            [X, X, X, X, o, o, o, o, o, o, o],
            [X, X, X, X, o, o, o, o, o, o, o],
            [X, X, X, X, X, X, X, X, o, o, o],  # matching queries see no denoising query
            [X, X, X, X, X, X, X, X, o, o, o],
            [X, X, X, X, X, X, X, X, o, o, o],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(q.attn_mask, golden)
    # slots: per group, max_gt positives then max_gt negatives; padding where an image has fewer boxes
    P, N, _ = 1, 2, 0
    kind = torch.where(q.positive, P, torch.where(q.labels >= 0, N, 0))
    assert kind.tolist() == [[P, P, N, N, P, P, N, N], [_] * 8, [P, _, N, _, P, _, N, _]]
    assert q.gt_index[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1] and q.gt_index[2, ::2].tolist() == [0, 0, 0, 0]
    padding = q.labels < 0
    assert (q.content[padding] == 0).all() and (q.reference[padding] == 0).all()
    # an all-empty batch: no denoising query, matching queries unmasked
    empty = contrastive_denoising_queries(_targets([0, 0]), nn.Embedding(5, 8), num_queries=3, num_classes=4)
    assert empty.pad_size == 0 and empty.content.shape == (2, 0, 8)
    assert torch.equal(empty.attn_mask, torch.zeros(3, 3, dtype=torch.bool))
    # one group of one positive and one negative, one matching query: the group sees that query
    assert torch.equal(denoising_attention_mask(1, 1, 1), torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0]]).bool())


def test_box_noise_stays_within_its_bounds_and_negatives_lie_farther():
    gt = _targets([400])[0]["boxes"]
    scale = 0.4
    half = torch.cat([gt[:, 2:] / 2, gt[:, 2:] / 2], 1) * scale
    g = torch.Generator().manual_seed(3)
    pos = noised_boxes(gt, torch.zeros(400, dtype=torch.bool), scale, g)
    neg = noised_boxes(gt, torch.ones(400, dtype=torch.bool), scale, g)
    d_pos = (box_cxcywh_to_xyxy(pos) - box_cxcywh_to_xyxy(gt)).abs()
    d_neg = (box_cxcywh_to_xyxy(neg) - box_cxcywh_to_xyxy(gt)).abs()
    eps = 1e-6
    assert (d_pos <= half + eps).all()  # positives: each corner within scale * half-size
    assert (d_neg >= half - eps).all() and (d_neg <= 2 * half + eps).all()  # negatives: one to two times that
    # uniform offsets: half the bound on average for positives, one and a half for negatives
    assert 0.45 < (d_pos / half).mean().item() < 0.55 and 1.45 < (d_neg / half).mean().item() < 1.55


def test_labels_flip_at_half_the_noise_ratio():
    num_classes = 91
    targets = _targets([10] * 64, num_classes=num_classes)
    g = torch.Generator().manual_seed(7)
    q = contrastive_denoising_queries(
        targets,
        nn.Embedding(num_classes + 1, 8),
        num_queries=5,
        num_classes=num_classes,
        label_noise_ratio=0.5,
        generator=g,
    )
    filled = q.labels >= 0
    originals = torch.stack([t["labels"] for t in targets])  # (B, 10)
    original = originals.gather(1, q.gt_index.clamp(min=0))
    changed = (q.labels != original)[filled].float().mean().item()
    # replaced with probability 0.25, and a replacement is a different class 90 times in 91
    expected = 0.25 * (1 - 1 / num_classes)
    assert abs(changed - expected) < 0.02, changed  # 12800 draws: sd 0.004
    quiet = contrastive_denoising_queries(targets, nn.Embedding(92, 8), 5, num_classes, label_noise_ratio=0.0)
    assert torch.equal(quiet.labels[quiet.labels >= 0], original[quiet.labels >= 0])
    # content is the label book's row of the noised label, reference the box's logit
    emb = nn.Embedding(num_classes + 1, 8)
    q2 = contrastive_denoising_queries(targets[:2], emb, 5, num_classes, generator=torch.Generator().manual_seed(1))
    b, s = 1, 3
    assert torch.allclose(q2.content[b, s], emb.weight[q2.labels[b, s]])
    assert torch.allclose(torch.sigmoid(q2.reference[b, s]), q2.boxes[b, s].clamp(1e-3, 1 - 1e-3), atol=1e-6)


def test_denoising_pairs_and_losses_follow_the_reference():
    from clockdistill.config.sections import LossConfig
    from clockdistill.losses.criterion import SetCriterion
    from clockdistill.models.denoising import denoising_indices

    targets = _targets([2, 0, 3])
    q = contrastive_denoising_queries(targets, nn.Embedding(5, 8), num_queries=4, num_classes=4, dn_number=2)
    pairs = denoising_indices(q)
    single_pad = 2 * q.max_gt  # the reference: output_idx = group * single_pad + t, tgt_idx = t per group
    for (slots, gts), t in zip(pairs, targets):
        n = len(t["labels"])
        expected = [g * single_pad + i for g in range(q.groups) for i in range(n)]
        assert slots.tolist() == expected and gts.tolist() == list(range(n)) * q.groups
    # the pairs built from the host's box counts equal those read from the positive-slot mask
    from_mask = []
    for b in range(len(targets)):
        slots = torch.nonzero(q.positive[b]).flatten()
        from_mask.append((slots.tolist(), q.gt_index[b, slots].tolist()))
    assert [(s.tolist(), g.tolist()) for s, g in pairs] == from_mask
    # outputs that reconstruct every positive exactly and call everything else background
    B, pad = q.labels.shape
    logits = torch.full((B, pad, 4), -12.0)
    boxes = torch.full((B, pad, 4), 0.5)
    for b, (slots, gts) in enumerate(pairs):
        logits[b, slots, targets[b]["labels"][gts]] = 12.0
        boxes[b, slots] = targets[b]["boxes"][gts]
    criterion = SetCriterion.from_config(LossConfig(), 4)
    perfect = criterion.denoising_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, pairs, 5.0 * q.groups)
    assert perfect["loss_bbox_dn"].item() < 1e-6 and perfect["loss_giou_dn"].item() < 1e-5
    assert perfect["loss_cls_dn"].item() < 1e-6
    shifted = boxes.clone()
    shifted[..., 0] += 0.01  # every slot's cx off by 0.01: only the positives count
    off = criterion.denoising_losses({"pred_logits": logits, "pred_boxes": shifted}, targets, pairs, 5.0 * q.groups)
    assert abs(off["loss_bbox_dn"].item() - 0.01 * 5 * q.groups / (5.0 * q.groups)) < 1e-5
    negative = (q.labels >= 0) & ~q.positive
    logits[negative] = 12.0  # a negative that claims an object is punished
    bad = criterion.denoising_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, pairs, 5.0 * q.groups)
    assert bad["loss_cls_dn"].item() > 1.0
