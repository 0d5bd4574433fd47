"""A padding-invariant teacher (distill.teacher_padding: invariant, models/invariance.py): an image's
memory and decoder outputs in a batch padded to a larger companion equal the image's alone, for every
family with a padding mask; the reference's own numbers there depend on the batch."""

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.data.transforms import collate
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models.build import build_detector
from clockdistill.models.invariance import pad_multiple_for

FAMILIES = {
    "hybrid": {"preset": "hybrid-tiny-teacher"},
    "deformable-two-stage": {"preset": "deformable-detr-tiny-teacher", "two_stage": True, "box_refine": True},
    "dab": {"preset": "dab-detr-tiny-teacher"},
    "dino": {"preset": "dino-tiny-teacher"},
}
# measured (seeds 0-2, weights perturbed): memory within 2.2e-6 of its scale, logits within 9.6e-7, boxes
# within 2.4e-7 (float rounding); the reference's differ by 0.51-1.07 of the memory's scale, logits by
# 0.29-1.74, boxes by 3.8e-3 (hybrid, DAB) to 0.97 (two-stage Deformable DETR and DINO: other proposals)
TOL = 1e-5


def _teacher(model_keys: dict, seed: int, padding: str) -> FrozenTeacher:
    torch.manual_seed(seed)
    model = build_detector(resolve_config({"model": model_keys}).model, 3).eval()
    with torch.no_grad():  # random heads away from their zero initialisation, so that boxes move too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return FrozenTeacher(model, padding=padding)


def _own_levels(mem, index: int) -> list[torch.Tensor]:
    """Image `index`'s tokens per level, cut to its valid grid (from the level's padding mask)."""
    out, start = [], 0
    for h, w in mem.spatial_shapes:
        grid = mem.memory[index, start : start + h * w].view(h, w, -1)
        valid = ~mem.padding_mask[index, start : start + h * w].view(h, w)
        out.append(grid[: int(valid[:, 0].sum()), : int(valid[0].sum())])
        start += h * w
    return out


def _alone_and_padded(teacher: FrozenTeacher, seed: int):
    g = torch.Generator().manual_seed(100 + seed)
    a = torch.randn(3, 90, 117, generator=g)  # no side a multiple of any stride
    b = torch.randn(3, 150, 170, generator=g)
    target = {"size": torch.tensor([90, 117])}
    alone = collate([(a, target)])
    padded = collate(
        [(a, target), (b, {"size": torch.tensor([150, 170])})], multiple=pad_multiple_for(teacher.detector)
    )  # fmt: skip
    m = pad_multiple_for(teacher.detector)
    assert all(side % m == 0 and side > 150 for side in padded[0].shape[-2:])
    results = []
    for images, mask, _ in (alone, padded):
        results.append((teacher.encode(images, mask), teacher(images, mask)))
    return results


def _differences(results) -> dict[str, float]:
    (mem_a, out_a), (mem_b, out_b) = results
    levels = []
    for x, y in zip(_own_levels(mem_a, 0), _own_levels(mem_b, 0)):
        assert x.shape == y.shape  # the level masks mark exactly the image's own grid
        levels.append(float((x - y).abs().max() / x.abs().max()))
    return {
        "memory": max(levels),
        "logits": float((out_a["pred_logits"][0] - out_b["pred_logits"][0]).abs().max()),
        "boxes": float((out_a["pred_boxes"][0] - out_b["pred_boxes"][0]).abs().max()),
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_invariant_teacher_gives_an_image_its_outputs_alone(family):
    torch.set_num_threads(1)
    for seed in range(2):
        d = _differences(_alone_and_padded(_teacher(FAMILIES[family], seed, "invariant"), seed))
        assert d["memory"] < TOL and d["logits"] < TOL and d["boxes"] < TOL, (family, seed, d)


@pytest.mark.parametrize("family", ["hybrid", "dab"])
def test_the_reference_numbers_depend_on_the_batch(family):
    """The comparison above can fail: the reference's own outputs move with the padding."""
    torch.set_num_threads(1)
    d = _differences(_alone_and_padded(_teacher(FAMILIES[family], 0, "reference"), 0))
    assert d["memory"] > 1e-2, d


def test_an_unpadded_batch_runs_as_the_reference():
    """Within float rounding (the GroupNorm statistics are summed in another order)."""
    torch.set_num_threads(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    outs = [_teacher(FAMILIES["dino"], 0, padding)(images, mask) for padding in ("invariant", "reference")]
    assert torch.allclose(outs[0]["pred_logits"], outs[1]["pred_logits"], atol=1e-5)
    assert torch.allclose(outs[0]["pred_boxes"], outs[1]["pred_boxes"], atol=1e-6)
