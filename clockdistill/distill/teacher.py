"""The frozen teacher: loaded once, never trained, never in an optimizer, always in eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clockdistill.checkpoint import load_detector
from clockdistill.models.common import Memory


class FrozenTeacher(nn.Module):
    """Wraps a trained detector. `requires_grad_(False)` on every weight, every call under no-grad,
    and `.train()` from a parent leaves it in eval mode (BatchNorm statistics and dropout frozen)."""

    def __init__(self, detector: nn.Module, meta: dict[str, Any] | None = None):
        super().__init__()
        self.detector = detector.requires_grad_(False)
        self.meta = meta or {}
        super().train(False)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> "FrozenTeacher":
        model, meta = load_detector(checkpoint, device)
        return cls(model, meta)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @property
    def cfg(self):
        return self.detector.cfg

    @property
    def num_classes(self) -> int:
        return self.detector.num_classes

    @property
    def best_ap(self) -> float | None:
        """The teacher's best validation AP as recorded in its checkpoint (the reference line)."""
        ap = self.meta.get("best_ap")
        return float(ap) if ap is not None and ap >= 0 else None

    @torch.no_grad()
    def encode(self, images: Tensor, mask: Tensor) -> Memory:
        return self.detector.encode(images, mask)

    @torch.no_grad()
    def decode(self, mem: Memory, **queries: Tensor) -> dict[str, Any]:
        return self.detector.decode(mem, **queries)

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor, extra_queries: dict[str, Tensor] | None = None) -> dict[str, Any]:
        return self.detector(images, mask, extra_queries)

    @torch.no_grad()
    def predict_default(self, mem: Memory) -> dict[str, Any]:
        """The teacher's own (learned) queries decoded on a memory."""
        own = self.detector.default_queries(mem)
        return self.detector.decode(mem, own.content, own.reference, own.position)
