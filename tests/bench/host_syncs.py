"""Benchmark: host reads per training step, by source line (each one a host sync on a GPU).

    python tests/bench/host_syncs.py [--batch 4] [--size 96]

One distillation step (forward, losses, backward) of each family's tiny student with its tiny
teacher, counted by clockdistill/ops/host_reads.py. A CPU shows the same operations a GPU would
sync on; reads of tensors already on the host (the matchers' cost copies after their one `.cpu()`)
are listed too, marked "(host copy)". On a GPU, `torch.cuda.set_sync_debug_mode("warn")` gives the
real list; run this there too when one is lent.
"""

from __future__ import annotations

import argparse

import torch

from clockdistill.config.layers import resolve_config
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models.build import build_detector
from clockdistill.ops.host_reads import HostReads

PAIRS = [
    ("hybrid-tiny-student", "none"),
    ("hybrid-tiny-student", "clockdistill"),
    ("dino-tiny-student", "clockdistill"),
    ("rtdetr-tiny-student", "clockdistill"),
    ("deformable-detr-tiny-student", "detrdistill"),
    ("dab-detr-tiny-student", "vanilla_kd"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    for preset, method in PAIRS:
        torch.manual_seed(0)
        cfg = resolve_config({"model": {"preset": preset}, "distill": {"method": method}})
        teacher = build_detector(resolve_config({"model": {"preset": preset.replace("student", "teacher")}}).model, 3)
        task = Distiller(FrozenTeacher(teacher), build_detector(cfg.model, 3), cfg)
        targets = [
            {"labels": torch.arange(i % 3 + 1) % 3, "boxes": torch.rand(i % 3 + 1, 4) * 0.4 + 0.3,
             "size": torch.tensor([args.size, args.size])}
            for i in range(args.batch)
        ]  # fmt: skip
        images = torch.randn(args.batch, 3, args.size, args.size)
        mask = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
        task.losses(images, mask, targets)  # warm-up
        with HostReads() as reads:
            terms, weights = task.losses(images, mask, targets)
            sum(weights[k] * v for k, v in terms.items() if k in weights).backward()
        print(f"{preset} / {method}: {reads.device_reads} device reads per step ({reads.total} with host-copy reads)")
        for where, n in reads.by_source.most_common():
            copy = " (host copy)" if reads.of_host_copy(where) else ""
            print(f"  {n:4d}  {where}{copy}")


if __name__ == "__main__":
    main()
