"""The distillation methods and what each one needs: the one table (`METHODS`, name -> Method) that
the config, the distiller, the teacher-output cache and the sweeps read.

    method         memory term             target-aware queries   matched logits   DETRDistill parts
    none           -                       -                      -                -
    clockdistill   masked (location/scale) yes                    -                -
    memory_only    masked                  -                      -                -
    logit_only     -                       yes                    -                -
    fitnet         plain MSE               -                      -                -
    vanilla_kd     -                       -                      yes (Hungarian)  -
    detrdistill    -                       -                      yes (Hungarian)  target-aware feature
                                                                                   imitation, query-prior
                                                                                   assignment

(DETRDistill's three parts each have a switch, distill.detrdistill.*; `matched_logits` is its first.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    memory: str | None  # "masked": CLoCKDistill's GT location/scale-masked term | "plain": FitNet's MSE | None
    target_queries: bool  # GT-built queries decoded by teacher and student (TCLD)
    matched_logits: bool  # teacher and student predictions of their own queries, Hungarian-matched
    summary: str
    detrdistill: bool = False  # DETRDistill's feature imitation and query-prior assignment (switchable)

    @property
    def uses_teacher(self) -> bool:
        return self.memory is not None or self.target_queries or self.matched_logits or self.detrdistill

    @property
    def logit_terms(self) -> bool:
        """Whether the method adds kd_cls/kd_l1/kd_giou terms per distilled decoder layer."""
        return self.target_queries or self.matched_logits

    @property
    def teacher_cache_parts(self) -> tuple[str, ...]:
        """The teacher outputs a cache must hold for this method (see distill/cache.py)."""
        return tuple(
            part
            for part, used in (
                ("memory", self.memory is not None),
                ("queries", self.target_queries),
                ("default", self.matched_logits),
            )
            if used
        )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("clockdistill", "masked", True, False, "memory term + target-aware logit term"),
        Method("none", None, False, False, "the student alone"),
        Method("vanilla_kd", None, False, True, "KL / L1 / GIoU on Hungarian-matched teacher and student predictions"),
        Method("fitnet", "plain", False, False, "plain MSE between the memories over every unpadded token"),
        Method("memory_only", "masked", False, False, "the memory term alone"),
        Method("logit_only", None, True, False, "the target-aware logit term alone"),
        Method(
            "detrdistill",
            None,
            False,
            True,
            "DETRDistill: Hungarian-matched logits, target-aware feature imitation, query-prior assignment",
            detrdistill=True,
        ),
    )
}
