import itertools

import torch

from clockdistill.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
)


def random_xyxy(n: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.rand(n, 2, 2, generator=gen)
    lo, hi = p.min(1).values, p.max(1).values + 0.01
    return torch.cat([lo, hi], 1)


def brute_iou_giou(a, b):
    ix0, iy0, ix1, iy1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hx0, hy0, hx1, hy1 = min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])
    hull = (hx1 - hx0) * (hy1 - hy0)
    return inter / union, inter / union - (hull - union) / hull


def test_conversions_round_trip():
    gen = torch.Generator().manual_seed(0)
    boxes = random_xyxy(50, gen)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes, atol=1e-6)
    assert torch.allclose(
        box_xyxy_to_cxcywh(torch.tensor([[1.0, 2.0, 5.0, 4.0]])), torch.tensor([[3.0, 3.0, 4.0, 2.0]])
    )


def test_iou_and_giou_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    a, b = random_xyxy(7, gen), random_xyxy(5, gen)
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    for i, j in itertools.product(range(7), range(5)):
        ref_iou, ref_giou = brute_iou_giou(a[i].tolist(), b[j].tolist())
        assert abs(iou[i, j].item() - ref_iou) < 1e-5
        assert abs(giou[i, j].item() - ref_giou) < 1e-5
    diag = elementwise_generalized_box_iou(a[:5], b)
    assert torch.allclose(diag, giou[torch.arange(5), torch.arange(5)], atol=1e-6)


def test_giou_known_values():
    same = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    far = torch.tensor([[2.0, 0.0, 3.0, 1.0]])  # disjoint: hull 3, union 2 -> giou = -1/3
    assert generalized_box_iou(same, same).item() == 1.0
    assert abs(generalized_box_iou(same, far).item() + 1 / 3) < 1e-6


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-5)
