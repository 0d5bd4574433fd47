"""Small tensors of Python values on a device without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory and waits for the copy, and so for
every kernel queued before it: a training step that builds a few such tensors per layer drains the
GPU queue as often. On a GPU these go through pinned memory with an asynchronous copy (the caching
host allocator keeps the buffer until the copy is done); elsewhere they are built as before (the
TorchScript export traces that form, clockdistill/exporters.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def small_tensor(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor (e.g. matching indices) on `device`; on a GPU through pinned memory, asynchronously."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
