"""What the step benchmarks share: the interleaved timing loop and one training step."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable


def interleaved_medians(jobs: dict[Hashable, Callable[[], None]], repeats: int, sync: Callable[[], None]) -> dict[Hashable, float]:
    """Median seconds of each job over `repeats` rounds; each round runs every job once, in turn, so
    machine noise hits all alike. `sync` waits for the device (CUDA) around each timed call."""
    times: dict[Hashable, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def training_step(task, optimizer, images, mask, targets, bf16: bool) -> None:
    """One full step of a TrainingTask (losses, backward, optimizer step); bf16 autocast when asked
    (CUDA), as training runs."""
    import torch

    with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        terms, weights = task.losses(images, mask, targets)
    loss = sum(weights[k] * v for k, v in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
