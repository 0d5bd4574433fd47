"""What a model costs to run: parameter count and forward latency (the student properties a sweep
can optimise against AP, and the figures a model card reports)."""

from __future__ import annotations

import time

import torch
from torch import nn


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_latency_ms(model: nn.Module, size: int, device: torch.device, repeats: int = 5) -> float:
    """Median time of one forward pass on one size x size image on `device`, in ms (after a warm-up)."""
    model = model.to(device).eval()
    images = torch.randn(1, 3, size, size, device=device)
    mask = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(images, mask)
            _sync(device)
            if i:
                times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def cpu_latency_ms(model: nn.Module, size: int, repeats: int = 10) -> float:
    """Median one-image forward time on the CPU, in ms."""
    return forward_latency_ms(model, size, torch.device("cpu"), repeats)
