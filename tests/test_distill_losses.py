"""Location masks and distillation losses against hand-drawn grids and hand-written formulas."""

import math

import pytest
import torch

from clockdistill.config.distill import LogitDistillConfig
from clockdistill.distill.losses import fitnet_term, logit_terms, memory_terms
from clockdistill.distill.masks import level_masks, level_token_mask, memory_masks


def _xyxy_to_target(boxes, h, w):
    """Pixel xyxy boxes -> a dataset-style target (normalised cxcywh of an h x w image)."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.stack(
        [(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], -1
    )
    return {"boxes": cxcywh, "labels": torch.zeros(len(b), dtype=torch.long), "size": torch.tensor([h, w])}


def test_box_masks_on_a_hand_drawn_grid():
    # A 64 x 64 padded batch image; this image is 64 wide and 48 tall, so grid rows 6-7 are padding.
    # Level grid 8 x 8 (one cell = 8 px). Box A covers cells x 1..2, y 1..3 (6 cells; its pixel edges
    # 9..23 x 9..31 are not on cell borders: min edges round down, max edges up). Box B is the single
    # cell (x 2, y 2), inside A: there the smaller box wins.
    target = _xyxy_to_target([[9, 9, 23, 31], [16, 16, 24, 24]], h=48, w=64)
    pad = torch.zeros(1, 8, 8, dtype=torch.bool)
    pad[:, 6:] = True
    m, s = memory_masks([target], (64, 64), [(8, 8)], pad.flatten(1))
    m, s = m.view(8, 8), s.view(8, 8)

    exp_m = torch.zeros(8, 8)
    exp_m[1:4, 1:3] = 1
    exp_s = torch.full((8, 8), 1 / 42)  # 48 unpadded tokens - 6 in boxes = 42 background tokens
    exp_s[1:4, 1:3] = 1 / 6
    exp_s[2, 2] = 1.0
    exp_s[6:] = 0
    assert torch.equal(m, exp_m)
    assert torch.allclose(s, exp_s)


def test_padded_tokens_are_in_neither_mask_even_under_a_box():
    # The box reaches the bottom edge of the image; with ceil rounding it would touch row 3 on a
    # 4-row grid whose last row is padding.
    target = _xyxy_to_target([[0, 20, 32, 48]], h=48, w=64)
    pad = torch.zeros(1, 4, 4, dtype=torch.bool)
    pad[:, 3:] = True
    boxes = torch.tensor([[[0.0, 20.0, 32.0, 52.0]]])  # grown past the image into the padding
    m, s = level_masks(boxes, torch.ones(1, 1, dtype=torch.bool), (64, 64), (4, 4), pad)
    assert m[0, 3].sum() == 0 and s[0, 3].sum() == 0
    assert m[0, 1:3, :2].eq(1).all()
    m2, _ = memory_masks([target], (64, 64), [(4, 4)], pad.flatten(1))
    assert m2.view(4, 4)[3].sum() == 0


def test_empty_image_is_all_background_and_two_levels_are_concatenated():
    targets = [_xyxy_to_target([], 32, 32), _xyxy_to_target([[0, 0, 16, 16]], 32, 32)]
    shapes = [(4, 4), (2, 2)]
    pad = torch.zeros(2, 20, dtype=torch.bool)
    m, s = memory_masks(targets, (32, 32), shapes, pad)
    assert m[0].sum() == 0
    assert torch.allclose(s[0, :16], torch.full((16,), 1 / 16)) and torch.allclose(s[0, 16:], torch.full((4,), 1 / 4))
    # Image 2: the box is the top-left quarter: 4 of 16 cells on level 0, 1 of 4 on level 1.
    assert m[1, :16].sum() == 4 and m[1, 16:].sum() == 1
    assert torch.allclose(s[1, :16].view(4, 4)[:2, :2], torch.full((2, 2), 1 / 4))
    assert torch.allclose(s[1, 16:].view(2, 2), torch.tensor([[1.0, 1 / 3], [1 / 3, 1 / 3]]))
    assert torch.equal(level_token_mask(shapes, [1], torch.device("cpu")), torch.tensor([False] * 16 + [True] * 4))


def test_gaussian_mask_falls_off_around_the_box_and_scales_by_the_grown_area():
    # 10 x 10 grid; a 2 x 2-cell box at cells 4..5, grown x2 -> a margin of 1 cell, sigma 0.5 cell.
    boxes = torch.tensor([[[4.0, 4.0, 6.0, 6.0]]])
    m, s = level_masks(
        boxes,
        torch.ones(1, 1, dtype=torch.bool),
        (10, 10),
        (10, 10),
        torch.zeros(1, 10, 10, dtype=torch.bool),
        mode="gaussian",
        grow=2.0,
    )
    m, s = m[0], s[0]
    assert m[4:6, 4:6].eq(1).all()
    assert m[4, 3].item() == pytest.approx(math.exp(-0.5))  # cell centre 0.5 cell left of the box
    assert m[3, 3].item() == pytest.approx(math.exp(-1.0))
    assert m[4, 2].item() == 0 and m[0, 0].item() == 0  # outside the grown box
    assert s[4, 4].item() == pytest.approx(1 / 16) and s[3, 3].item() == pytest.approx(
        1 / 16
    )  # grown box is 4 x 4 cells
    assert s[0, 0].item() == pytest.approx(1 / (100 - 16))


def test_memory_terms_match_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 5, 3
    t, st = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    m = (torch.rand(B, N, generator=g) > 0.5).float()
    s = torch.rand(B, N, generator=g)
    s[1, 4] = 0.0  # a padded token: S = 0 and M = 0
    m[1, 4] = 0.0
    fg = bg = 0.0
    for b in range(B):
        for i in range(N):
            d2 = sum((t[b, i, c].item() - st[b, i, c].item()) ** 2 for c in range(C))
            fg += m[b, i].item() * s[b, i].item() * d2
            bg += (1 - m[b, i].item()) * s[b, i].item() * d2
    terms = memory_terms(t, st, m, s)
    assert terms["kd_mem_fg"].item() == pytest.approx(fg / B, rel=1e-5)
    assert terms["kd_mem_bg"].item() == pytest.approx(bg / B, rel=1e-5)
    mean_terms = memory_terms(t, st, m, s, reduce="mean")
    assert mean_terms["kd_mem_fg"].item() == pytest.approx(fg / B / C, rel=1e-5)
    only_last = memory_terms(t, st, m, s, token_mask=torch.tensor([0.0, 0, 0, 0, 1]))
    fg_last = sum(m[b, 4].item() * s[b, 4].item() * ((t[b, 4] - st[b, 4]) ** 2).sum().item() for b in range(B))
    assert only_last["kd_mem_fg"].item() == pytest.approx(fg_last / B, rel=1e-5, abs=1e-9)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 4] = True
    d2_mean = ((t - st) ** 2).mean(-1)
    assert fitnet_term(t, st, pad).item() == pytest.approx((d2_mean.sum() - d2_mean[1, 4]).item() / 9, rel=1e-5)


def _kl_by_hand(zt, zs, T, form):
    C = len(zt)
    if form == "softmax_kl":
        et, es = [math.exp(z / T) for z in zt], [math.exp(z / T) for z in zs]
        pt, ps = [e / sum(et) for e in et], [e / sum(es) for e in es]
        return T * T * sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(C)) / C
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    total = 0.0
    for c in range(C):
        pt, ps = sig(zt[c] / T), sig(zs[c] / T)
        total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return T * T * total / C


def _giou_by_hand(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize(
    "form,norm,conf",
    [("softmax_kl", "sum", "max"), ("binary_kl", "weight", "squared"), ("softmax_kl", "queries", "none")],
)
def test_logit_terms_match_the_formula_written_out(form, norm, conf):
    g = torch.Generator().manual_seed(1)
    B, K, C, T = 2, 3, 4, 4.0
    zt, zs = torch.randn(B, K, C, generator=g) * 3, torch.randn(B, K, C, generator=g) * 3
    bt = torch.cat([0.3 + 0.4 * torch.rand(B, K, 2, generator=g), 0.1 + 0.3 * torch.rand(B, K, 2, generator=g)], -1)
    bs = torch.cat([0.3 + 0.4 * torch.rand(B, K, 2, generator=g), 0.1 + 0.3 * torch.rand(B, K, 2, generator=g)], -1)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    cfg = LogitDistillConfig(temperature=T, cls_form=form, cls_norm=norm, confidence=conf)
    cls, l1, giou = logit_terms(
        {"pred_logits": zt, "pred_boxes": bt}, {"pred_logits": zs, "pred_boxes": bs}, valid, cfg
    )

    ws, kls, l1s, gious = [], [], [], []
    for b in range(B):
        for k in range(K):
            if not valid[b, k]:
                continue
            w = max(1 / (1 + math.exp(-z)) for z in zt[b, k].tolist())
            w = {"max": w, "squared": w * w, "none": 1.0}[conf]
            ws.append(w)
            kls.append(_kl_by_hand(zt[b, k].tolist(), zs[b, k].tolist(), T, form))
            l1s.append(sum(abs(x - y) for x, y in zip(bs[b, k].tolist(), bt[b, k].tolist())) / 4)
            gious.append(1 - _giou_by_hand(bs[b, k].tolist(), bt[b, k].tolist()))
    exp_cls = sum(w * kl for w, kl in zip(ws, kls))
    exp_cls /= {"sum": 1.0, "weight": sum(ws), "queries": len(ws)}[norm]
    assert cls.item() == pytest.approx(exp_cls, rel=1e-4)
    assert l1.item() == pytest.approx(sum(w * x for w, x in zip(ws, l1s)) / sum(ws), rel=1e-4)
    assert giou.item() == pytest.approx(sum(w * x for w, x in zip(ws, gious)) / sum(ws), rel=1e-4)


def test_confidence_threshold_drops_unsure_teacher_outputs():
    zt = torch.tensor([[[3.0, -3.0], [-3.0, -2.5]]])  # confidences 0.95 and 0.076
    zs = torch.zeros(1, 2, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    full = logit_terms(
        {"pred_logits": zt, "pred_boxes": boxes}, {"pred_logits": zs, "pred_boxes": boxes}, valid, LogitDistillConfig()
    )[0]
    cut = logit_terms(
        {"pred_logits": zt, "pred_boxes": boxes},
        {"pred_logits": zs, "pred_boxes": boxes},
        valid,
        LogitDistillConfig(confidence_threshold=0.5),
    )[0]
    only_first = logit_terms(
        {"pred_logits": zt[:, :1], "pred_boxes": boxes[:, :1]},
        {"pred_logits": zs[:, :1], "pred_boxes": boxes[:, :1]},
        valid[:, :1],
        LogitDistillConfig(),
    )[0]
    assert cut.item() == pytest.approx(only_first.item()) and cut.item() < full.item()


@pytest.mark.parametrize("normalize", ["channel", "teacher"])
def test_scale_free_memory_error_ignores_the_memorys_scale_width_and_padding(normalize):
    g = torch.Generator().manual_seed(1)
    B, N, C = 2, 6, 4
    t = torch.randn(B, N, C, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 0.7
    st = t + 0.3 * torch.randn(B, N, C, generator=g)
    m = (torch.rand(B, N, generator=g) > 0.5).float()
    s = torch.rand(B, N, generator=g) + 0.1
    s[1, 5], m[1, 5] = 0.0, 0.0  # a padded token
    ref = memory_terms(t, st, m, s, normalize=normalize)
    raw = memory_terms(t, st, m, s)
    for name, (tt, ss) in {
        "x40": (t * 40, st * 40),  # a memory 40 times larger
        "4x wider": (t.repeat(1, 1, 4), st.repeat(1, 1, 4)),  # d_model 16 instead of 4, same content
    }.items():
        other = memory_terms(tt, ss, m, s, normalize=normalize)
        for key in ref:
            assert other[key].item() == pytest.approx(ref[key].item(), rel=1e-4), (name, key)
        assert memory_terms(tt, ss, m, s)["kd_mem_fg"].item() > 3.9 * raw["kd_mem_fg"].item()  # raw grows
    padded = t.clone()
    padded[1, 5] = 1e4  # what padding holds never reaches the statistics
    assert memory_terms(padded, st, m, s, normalize=normalize)["kd_mem_fg"].item() == pytest.approx(
        ref["kd_mem_fg"].item(), rel=1e-5
    )


def test_channel_normalized_memory_error_written_out():
    g = torch.Generator().manual_seed(2)
    B, N, C = 1, 4, 2
    t, st = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    m, s = torch.ones(B, N), torch.ones(B, N)
    var = [sum((t[0, i, c].item() - t[0, :, c].mean().item()) ** 2 for i in range(N)) / N for c in range(C)]
    fg = sum((t[0, i, c].item() - st[0, i, c].item()) ** 2 / var[c] for i in range(N) for c in range(C)) / C
    assert memory_terms(t, st, m, s, normalize="channel")["kd_mem_fg"].item() == pytest.approx(fg, rel=1e-4)
    ms = sum((t[0, i] ** 2).sum().item() for i in range(N)) / N
    fg_t = sum(((t[0, i] - st[0, i]) ** 2).sum().item() for i in range(N)) / ms
    assert memory_terms(t, st, m, s, normalize="teacher")["kd_mem_fg"].item() == pytest.approx(fg_t, rel=1e-4)
