"""Host reads in a training step (each one a host sync on a GPU; counted on the CPU by
clockdistill/ops/host_reads.py): a distillation step of every family reads values back only where
Hungarian matching needs them on the host, one copy of all the costs of a criterion call, and where
DINO's label noise draws its flips (the reference's order of draws). Before (tiny pairs, batch 4):
13 to 23 reads per step; the criterion copied each decoder layer's costs on its own, the location
masks read every image's size, the denoising queries which slots were filled and the loss's pairs
from a mask, and vanilla KD / DETRDistill copied and checked each image's costs on their own."""

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models.build import build_detector
from clockdistill.ops.host_reads import HostReads

# (file, operation) pairs a step may read through; the matchers read their host copy of the costs
ALLOWED = {
    ("losses/matcher.py", "cpu"),
    ("losses/matcher.py", "_local_scalar_dense"),
    ("losses/matcher.py", "numpy"),
    ("distill/distiller.py", "cpu"),
    ("distill/distiller.py", "_local_scalar_dense"),
    ("distill/distiller.py", "numpy"),
    ("models/denoising.py", "nonzero"),  # flipped_labels
}


@pytest.mark.parametrize(
    "preset,method,ceiling",
    [  # reads of device values per step: one copy of every matching cost of a criterion call (and of the
        # matched-logit terms, DETRDistill's query prior), DINO / RT-DETR's label-flip draw
        ("hybrid-tiny-student", "clockdistill", 1),
        ("dino-tiny-student", "clockdistill", 2),
        ("rtdetr-tiny-student", "clockdistill", 2),
        ("deformable-detr-tiny-student", "detrdistill", 3),
        ("dab-detr-tiny-student", "vanilla_kd", 2),
    ],
)
def test_a_distillation_step_reads_the_host_only_to_match(preset, method, ceiling):
    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": preset}, "distill": {"method": method}})
    teacher = build_detector(resolve_config({"model": {"preset": preset.replace("student", "teacher")}}).model, 3)
    task = Distiller(FrozenTeacher(teacher), build_detector(cfg.model, 3), cfg)
    g = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 2, 0][: i % 3 + 1]), "boxes": torch.rand(i % 3 + 1, 4, generator=g) * 0.4 + 0.3,
         "size": torch.tensor([96, 96])}
        for i in range(4)
    ]  # fmt: skip
    images, mask = torch.randn(4, 3, 96, 96, generator=g), torch.zeros(4, 96, 96, dtype=torch.bool)
    with HostReads() as reads:
        terms, weights = task.losses(images, mask, targets)
        sum(weights[k] * v for k, v in terms.items() if k in weights).backward()
    seen = {(where.split(":")[0], op) for where, op in (k.rsplit(" ", 1) for k in reads.by_source)}
    assert seen <= ALLOWED, dict(reads.by_source)
    assert reads.device_reads <= ceiling, dict(reads.by_source)
