"""What a teacher and a student must share for a method to compare them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from clockdistill.errors import ConfigError

log = logging.getLogger(__name__)


def check_query_prior(t, s) -> None:
    """The student can decode the teacher's queries: the same detector family and width."""
    if t.arch != s.arch or t.d_model != s.d_model:
        raise ConfigError(
            "distill.detrdistill.query_prior: the student decodes the teacher's queries, so it needs the teacher's "
            f"architecture and d_model ({t.arch}, {t.d_model}); got {s.arch}, {s.d_model} "
            "(or set distill.detrdistill.query_prior=false)"
        )
    if t.arch == "deformable" and (t.box_refine, t.two_stage) != (s.box_refine, s.two_stage):
        raise ConfigError(
            "distill.detrdistill.query_prior: teacher and student must be the same Deformable DETR variant "
            "(box_refine / two_stage), as the teacher's queries are points or proposals by variant"
        )


def check_memory_geometry(t, s) -> None:
    """Memory distillation compares token i of the teacher with token i of the student."""
    if t.arch != s.arch:
        raise ConfigError(f"model.arch: memory distillation needs the teacher's architecture ({t.arch}), got {s.arch}")
    if t.arch != "dab" and t.num_levels != s.num_levels:
        raise ConfigError(
            f"model.num_levels: memory distillation needs the teacher's {t.num_levels} levels, got {s.num_levels}"
        )
    if t.backbone_levels != s.backbone_levels:
        raise ConfigError(
            f"model.backbone_levels: memory distillation needs the teacher's backbone maps ({t.backbone_levels}), "
            f"got {s.backbone_levels}"
        )
    if t.dilation != s.dilation:
        raise ConfigError(
            f"model.dilation: memory distillation needs the teacher's feature stride (dilation {t.dilation}), "
            f"got dilation {s.dilation}"
        )


def memory_strides(m) -> list[int]:
    """Input pixels per token of each memory level of a detector config: RT-DETR 8, 16, 32; D-FINE the
    same, or 16, 32 (its N size's two levels); DAB-DETR its one level (32, or 16 dilated); the
    multi-scale families their backbone maps (C3-C5, from C2 with backbone_levels 4, C5 at 16 when
    dilated), then one stride-2 level after another."""
    if m.arch == "rtdetr":
        return [8, 16, 32][: m.num_levels]
    if m.arch == "dfine":
        return [8, 16, 32][3 - m.num_levels :]
    if m.arch == "dab":
        return [16 if m.dilation else 32]
    maps = ([4] if m.backbone_levels == 4 else []) + ([8, 16, 16] if m.dilation else [8, 16, 32])
    strides = maps if m.num_levels > 1 else maps[-1:]
    while len(strides) < m.num_levels:
        strides.append(strides[-1] * 2)
    return strides


@dataclass
class LevelPairs:
    """The memory levels a teacher and a student of different architectures share: (teacher level,
    student level, stride). Their tokens are compared on the common part of each pair's grids (the same
    stride from the same corner; a student that pads its input to a multiple of 32 has the larger grid)."""

    pairs: list[tuple[int, int, int]]

    def select(
        self,
        t: Tensor,
        t_shapes: list[tuple[int, int]],
        s: Tensor,
        s_shapes: list[tuple[int, int]],
        mask: Tensor,
    ) -> tuple[Tensor, Tensor, list[tuple[int, int]], Tensor, list[tuple[int, int]]]:
        """Teacher tokens t (B, Nt, C) and student tokens s (B, Ns, C) -> the paired tokens of both
        (B, N, C), the pairs' grids [(h, w)], their padding (B, N) from the image mask (B, H, W), and
        each grid's extent in input pixels [(h x stride, w x stride)]."""
        valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
        ts, ss, shapes, pads, extents = [], [], [], [], []
        for lt, ls, stride in self.pairs:
            (th, tw), (sh, sw) = t_shapes[lt], s_shapes[ls]
            h, w = min(th, sh), min(tw, sw)
            ts.append(_level(t, t_shapes, lt)[:, :h, :w].flatten(1, 2))
            ss.append(_level(s, s_shapes, ls)[:, :h, :w].flatten(1, 2))
            rows = torch.arange(h, device=mask.device) * stride
            cols = torch.arange(w, device=mask.device) * stride
            pad = (rows[None, :, None] >= valid_h[:, None, None]) | (cols[None, None, :] >= valid_w[:, None, None])
            pads.append(pad.flatten(1))
            shapes.append((h, w))
            extents.append((h * stride, w * stride))
        return torch.cat(ts, 1), torch.cat(ss, 1), shapes, torch.cat(pads, 1), extents


def _level(x: Tensor, shapes: list[tuple[int, int]], level: int) -> Tensor:
    start = sum(h * w for h, w in shapes[:level])
    h, w = shapes[level]
    return x[:, start : start + h * w].reshape(x.shape[0], h, w, x.shape[-1])


def memory_pairing(t, s) -> LevelPairs | None:
    """How the memory terms pair a teacher's tokens with a student's: token for token (None) for a pair
    of one architecture (check_memory_geometry), else the levels of equal stride (LevelPairs); a pair
    that shares no stride is refused in one line."""
    if t.arch == s.arch:
        check_memory_geometry(t, s)
        return None
    ts, ss = memory_strides(t), memory_strides(s)
    pairs, seen = [], set()
    for lt, stride in enumerate(ts):
        if stride in ss and stride not in seen:
            pairs.append((lt, ss.index(stride), stride))
            seen.add(stride)
    if not pairs:
        raise ConfigError(
            f"model: the teacher's memory levels (strides {ts}, {t.arch}) and the student's (strides {ss}, {s.arch}) "
            "share no stride; memory distillation needs at least one"
        )
    log.info(
        "memory distillation across architectures (%s -> %s): levels of stride %s (teacher levels %s, student %s)",
        t.arch,
        s.arch,
        [p[2] for p in pairs],
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return LevelPairs(pairs)
