"""What a model costs to run: parameter count and forward latency (the student properties a sweep
can optimise against AP, and the figures a model card reports).

A sweep's latency objective is a property of the architecture, not of a trial's weights, and a
trial that times itself while co-located trials train on the same device measures them as much as
itself. So latency is measured once per architecture, input size, device and precision on each node
(`node_latency_ms`: a table in the node cache directory), by the sweep's prebuild step before any
trial starts, alone on the node; a trial whose architecture is not in the table yet (model keys in
the search space) measures it once and says so in its log. It is measured in the precision the model
runs in after training (bf16 autocast on a GPU when it trained with train.amp, fp32 otherwise), the
median of 20 forwards after 3 warm-ups.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clockdistill.arrowcache import build_once, cache_root, content_key

log = logging.getLogger(__name__)
LATENCY_TABLE = "latency"  # a folder of the node cache directory


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def deployment_latency_ms(model: nn.Module, size: int, device: torch.device, amp: bool, repeats: int = 20) -> float:
    """Median one-image forward time (ms) after 3 warm-ups, in bf16 autocast on a GPU when `amp`."""
    model = model.to(device).eval()
    images = torch.randn(1, 3, size, size, device=device)
    mask = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    bf16 = device.type == "cuda" and amp
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(repeats + 3):
            _sync(device)
            t0 = time.perf_counter()
            model(images, mask)
            _sync(device)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def cpu_latency_ms(model: nn.Module, size: int, repeats: int = 10) -> float:
    """Median one-image fp32 forward time on the CPU, in ms (the model card's figure)."""
    return deployment_latency_ms(model, size, torch.device("cpu"), False, repeats)


def latency_key(cfg, device: torch.device) -> dict[str, Any]:
    """What a latency depends on: the architecture (the model section but its weights file), the input
    size, the device (its name; for a CPU its architecture and threads) and the precision."""
    model = {k: v for k, v in cfg.to_dict()["model"].items() if k != "backbone_weights"}
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"cpu {platform.machine()} x{torch.get_num_threads()} threads"
    precision = "bf16" if device.type == "cuda" and cfg.train.amp else "fp32"
    return {"model": model, "size": cfg.data.max_size, "device": where, "precision": precision}


def node_latency_ms(model: nn.Module, cfg, device: torch.device, why: str) -> tuple[float, bool]:
    """(latency in ms, whether it was measured now) of `model` built from config `cfg` on `device`, from
    the node's table in the cache directory (data.cache_dir: one file per architecture, size, device and
    precision, built once under the cache's lock), measured when the table does not hold it yet; `why`
    says in the entry who measured it."""
    key = latency_key(cfg, device)
    path = cache_root(cfg.data.cache_dir) / LATENCY_TABLE / f"{content_key(key)}.json"

    def measure(tmp: Path) -> None:
        ms = deployment_latency_ms(model, cfg.data.max_size, device, cfg.train.amp)
        tmp.write_text(json.dumps({"ms": ms, "measured": why, "at": time.strftime("%Y-%m-%d %H:%M:%S"), **key}))

    measured = bool(build_once(path, measure))  # one measurement per architecture on the node
    ms = float(json.loads(path.read_text())["ms"])
    if measured:
        log.info(
            "latency of %s at %d px on %s (%s): %.2f ms, measured %s",
            cfg.model.arch, cfg.data.max_size, key["device"], key["precision"], ms, why,
        )  # fmt: skip
    return ms, measured


def latency_table(cache_dir: str | Path = "") -> dict[str, dict[str, Any]]:
    """The node's latency entries (file stem -> ms, who measured it and when, and what it depends on)."""
    folder = cache_root(str(cache_dir)) / LATENCY_TABLE
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
