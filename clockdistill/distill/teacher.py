"""The frozen teacher: loaded once, never trained, never in an optimizer, always in eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clockdistill.checkpoint import load_detector
from clockdistill.models.common import Memory
from clockdistill.models.invariance import INVARIANT_ARCHS, PaddingInvariance


class FrozenTeacher(nn.Module):
    """Wraps a trained detector. `requires_grad_(False)` on every weight, every call under no-grad,
    and `.train()` from a parent leaves it in eval mode (BatchNorm statistics and dropout frozen).
    `padding` invariant: each image of a padded batch gets its outputs alone (models/invariance.py;
    the families with a padding mask), reference: the original code's batch-dependent numbers."""

    def __init__(self, detector: nn.Module, meta: dict[str, Any] | None = None, padding: str = "invariant"):
        super().__init__()
        self.detector = detector.requires_grad_(False)
        self.meta = meta or {}
        # (the families without a padding mask are never padded by their recipe: nothing to do there)
        invariant = padding == "invariant" and detector.cfg.arch in INVARIANT_ARCHS
        self.invariance = PaddingInvariance(detector) if invariant else None
        super().train(False)

    @classmethod
    def load(
        cls, checkpoint: str | Path, device: str | torch.device = "cpu", padding: str = "invariant"
    ) -> "FrozenTeacher":
        model, meta = load_detector(checkpoint, device)
        return cls(model, meta, padding)

    @property
    def padding_invariant(self) -> bool:
        """Whether an image's outputs are its own whatever its batch's padding (a cache keyed by image
        needs it; RT-DETR and D-FINE have no padding mask and are never padded by their recipe)."""
        return self.invariance is not None

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
        if self.invariance is None:
            return self.detector.encode(images, mask)
        with self.invariance.batch(mask):
            return self.detector.encode(images, mask)

    @torch.no_grad()
    def decode(self, mem: Memory, **queries: Tensor) -> dict[str, Any]:
        return self.detector.decode(mem, **queries)

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor, extra_queries: dict[str, Tensor] | None = None) -> dict[str, Any]:
        if self.invariance is None:
            return self.detector(images, mask, extra_queries)
        with self.invariance.batch(mask):
            return self.detector(images, mask, extra_queries)

    @torch.no_grad()
    def predict_default(self, mem: Memory) -> dict[str, Any]:
        """The teacher's own (learned) queries decoded on a memory."""
        own = self.detector.default_queries(mem)
        return self.detector.decode(mem, own.content, own.reference, own.position)
