"""What the step benchmarks share: a fixed batch, a device sync, one training step and the interleaved timing loop."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Hashable

import torch

from clockdistill.data.dataset import CocoDetection
from clockdistill.data.synth import write_synthetic
from clockdistill.data.transforms import DetectionTransform, collate


def interleaved_medians(
    jobs: dict[Hashable, Callable[[], None]], repeats: int, sync: Callable[[], None]
) -> dict[Hashable, float]:
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
    with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        terms, weights = task.losses(images, mask, targets)
    loss = sum(weights[k] * v for k, v in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fixed_batch(data: str | None, batch: int, size: int, device, prefix: str = "bench-", multiple: int = 0):
    """(dataset, images, mask, targets): `batch` training images of `data` (default: a small
    synthetic set in a temp dir) resized and padded to size x size (or, with `multiple`, to the
    batch's largest image rounded up to it), on `device`."""
    if data is None:
        data = str(write_synthetic(tempfile.mkdtemp(prefix=prefix), batch, 1, seed=0, progress=False))
    ds = CocoDetection(data, "train", DetectionTransform(size, train=False))
    items = [ds[i % len(ds)] for i in range(batch)]
    images, mask, targets = collate(items, pad_to=None if multiple else (size, size), multiple=max(multiple, 1))
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return ds, images.to(device), mask.to(device), targets


def device_sync(device):
    """A function that waits for `device`'s queued work (CUDA), or does nothing (CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
