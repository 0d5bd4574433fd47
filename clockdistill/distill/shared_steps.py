"""The Distiller's side of a teacher exchange (distill/exchange.py): which teacher outputs a step
claims, the ones it computes before its student, and the rest taken from a peer or computed."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from clockdistill.distill.exchange import SharedOutputs, TeacherExchange, digest
from clockdistill.distill.student_pass import target_queries
from clockdistill.models.common import Memory


class SharedTeacherSteps:
    """Mixed into the Distiller (its teacher, capabilities, queries and `shared`)."""

    shared: SharedOutputs | None

    @property
    def exchange(self) -> TeacherExchange | None:
        return self.shared.exchange if self.shared is not None else None

    @exchange.setter
    def exchange(self, exchange: TeacherExchange | None) -> None:
        self.shared = SharedOutputs(exchange, self._teacher_id) if exchange is not None else None

    def _shared_memory(self, images: Tensor, mask: Tensor) -> Memory:
        return self._shared(self._memory_part, lambda: self._encode(images, mask))

    @property
    def _memory_part(self) -> str:
        return "memory+features" if self.uses_feature else "memory"

    def _encode(self, images: Tensor, mask: Tensor) -> Memory:
        """The teacher's memory; shared with peers without the encoder's input tokens, which only
        DETRDistill's feature term reads (a third less to move)."""
        mem = self.teacher.encode(images, mask)
        return mem if self.uses_feature or self.shared is None else dataclasses.replace(mem, features=None)

    def _begin_shared_step(self, images, mask, targets, qs, cache) -> tuple[Memory | None, tuple | None]:
        """With an exchange: one claim for every teacher output of the batch and, when the memory is
        this run's to compute, every output it claimed now, before its student: its peers run their
        students meanwhile and find them published (had it decoded after its student, they would wait
        for its student too). Returns (that memory or None, (the target-aware queries' teacher inputs,
        their digest) or None)."""
        if self.shared is None or not self.caps.uses_teacher:
            return None, None
        tq = None
        if cache is None and self.uses_queries and qs.size:
            inputs = target_queries(self.teacher.detector, self.queries, qs)
            tq = (inputs, digest(*inputs.values()))
        parts = self._shared_parts(cache, tq)
        self.shared.begin(images, mask, targets, parts)
        if cache is not None or not self.shared.is_mine(self._memory_part):
            return None, tq
        mem_t = self._shared_memory(images, mask)
        early = {
            "queries": lambda: self.teacher.decode(mem_t, **tq[0]),
            "default": lambda: self.teacher.predict_default(mem_t),
        }
        for part, detail in parts:
            if part in early and self.shared.is_mine(part, detail):
                self.shared.get(part, early[part], detail, keep=True)
        return mem_t, tq

    def _shared(self, part: str, compute, detail: str = ""):
        """`compute()` (a teacher output of this step's batch), or the same output a peer on the same
        batch computed (distill/exchange.py)."""
        return compute() if self.shared is None else self.shared.get(part, compute, detail)

    def _shared_parts(self, cache, tq) -> list[tuple[str, str]]:
        """The teacher outputs this step reads, as (part, detail) exchange names: a cached run only
        the memory DETRDistill's query prior needs."""
        if cache is not None:
            return [(self._memory_part, "")] if self.uses_prior else []
        parts = [(self._memory_part, "")]
        if tq is not None:
            parts.append(("queries", tq[1]))
        if self.uses_prior:
            parts.append(("prior", ""))
        elif self.uses_matching or self.uses_feature:
            parts.append(("default", ""))
        return parts
