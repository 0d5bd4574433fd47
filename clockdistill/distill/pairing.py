"""What a teacher and a student must share for a method to compare them."""

from __future__ import annotations

from clockdistill.errors import ConfigError


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
