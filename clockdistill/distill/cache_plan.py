"""The teacher cache's plan: which parts, views and layout a run caches, where, and how big (the
file's key: every setting its rows depend on). distill/cache.py builds and reads the file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clockdistill.arrowcache import cache_root, content_key
from clockdistill.config.methods import METHODS
from clockdistill.config.sections import Config
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.index import file_digest
from clockdistill.data.transforms import longest_side_dims
from clockdistill.distill.compact import region_mask
from clockdistill.models.invariance import pad_multiple_for

FORMAT = 2


@dataclass
class CachePlan:
    """What a run would cache: which parts, which views, where, and how big."""

    path: Path
    parts: list[str]  # memory / queries / default
    views: list[tuple[int, int]]  # (longest side, flip)
    rows: int
    bytes: int
    layout: str = "canvas"  # canvas | image (module docstring)
    strides: tuple[int, ...] = ()  # the teacher's level strides (image layout)
    memory: str = "full"  # full | sampled (distill/compact.py)
    estimated: bool = False  # the size estimated from a sample of the images (sampled memory)


def image_layout(cfg: Config) -> bool:
    """Whether the run's batches are padded to their largest image (rows keyed by the image alone)."""
    return cfg.data.canvas is None


def needed_parts(cfg: Config) -> list[str]:
    return list(METHODS[cfg.distill.method].teacher_cache_parts)


def plan_cache(cfg: Config, teacher, dataset: CocoDetection, device: torch.device) -> CachePlan:
    """Views, parts, layout, file path and exact size of the run's cache (nothing computed but one
    small teacher pass that reads the memory's levels)."""
    dc, tcfg = cfg.distill, teacher.cfg
    parts = needed_parts(cfg)
    views = [(size, flip) for size in dataset.transform.sizes for flip in dataset.transform.views]
    layout = "image" if image_layout(cfg) else "canvas"
    probe_hw = cfg.data.canvas or (4 * pad_multiple_for(teacher.detector),) * 2
    with torch.no_grad():
        probe = teacher.encode(
            torch.zeros(1, 3, *probe_hw, device=device), torch.zeros(1, *probe_hw, dtype=torch.bool, device=device)
        )
    strides = tuple(2 ** round(math.log2(probe_hw[0] / h)) for h, _ in probe.spatial_shapes)
    memory = dc.teacher_cache_memory if "memory" in parts else "full"
    layers, C, Q = tcfg.dec_layers, teacher.num_classes, tcfg.num_queries
    n_gt = np.array([int((~dataset.index.annotations(i)[2]).sum()) for i in range(len(dataset))])
    G, R = dc.logit.groups, dc.logit.random_queries
    per_row = np.zeros((len(views), len(dataset)), dtype=np.int64)
    if memory == "sampled":
        for v, (size, flip) in enumerate(views):
            per_row[v] += _sampled_bytes(dataset, size, flip, strides, dc, tcfg.d_model)
    elif "memory" in parts:
        for v, (size, _) in enumerate(views):
            per_row[v] += _tokens(dataset, size, strides, layout, probe.memory.shape[1]) * tcfg.d_model * 2
    if "queries" in parts:
        per_row += layers * (G * n_gt + R) * (C + 4) * 4
    if "default" in parts:
        per_row += layers * Q * (C + 4) * 4
    weights = file_digest(Path(dc.teacher) / "model.safetensors")
    precision = "bf16" if device.type == "cuda" and cfg.train.amp else "fp32"
    key = content_key(
        {
            "format": FORMAT,
            "teacher": weights,
            "annotations": dataset.index.source_sha256,
            "layout": layout,
            "canvas": cfg.data.canvas,
            "teacher_padding": dc.teacher_padding,
            "views": views,
            "parts": parts,
            "with_pos": dc.memory.with_pos,
            "groups": G,
            "random_queries": R,
            "embedding_seed": dc.logit.embedding_seed,
            "precision": precision,
            "memory": memory,
            **(
                {
                    "background": dc.teacher_cache_background,
                    "region_grow": dc.cache_region_grow,
                    "dtype": dc.teacher_cache_dtype,
                }
                if memory == "sampled"
                else {}
            ),
        }
    )
    path = cache_root(cfg.data.cache_dir) / "teacher" / f"{weights[:12]}-{key}.arrow"
    rows = len(dataset) * len(views)
    return CachePlan(path, parts, views, rows, int(per_row.sum()), layout, strides, memory, memory == "sampled")


SIZE_SAMPLE = 256  # images a sampled cache's size is estimated from (evenly spaced over the split)


def _sampled_bytes(dataset: CocoDetection, size: int, flip: int, strides: tuple[int, ...], dc, d: int) -> np.ndarray:
    """Every image's estimated bytes of sampled memory at one view: (region tokens + background sample)
    x (D values + index + weight), plus int8's scales; the region counted on the image's own grid for
    SIZE_SAMPLE images, their mean used for every image."""
    index, per_value = dataset.index, 1 if dc.teacher_cache_dtype == "int8" else 2
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(SIZE_SAMPLE, len(dataset))).astype(int))
    stored = []
    for i in picks:
        w, h = longest_side_dims(int(index.widths[i]), int(index.heights[i]), size)
        boxes, _, crowd = index.annotations(i)
        xyxy = torch.from_numpy(boxes[~crowd]).float() / torch.tensor([index.widths[i], index.heights[i]] * 2)
        if flip:
            xyxy = torch.stack([1 - xyxy[:, 2], xyxy[:, 1], 1 - xyxy[:, 0], xyxy[:, 3]], 1)
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        (grid,) = image_grids([(h, w)], strides)
        region = region_mask({"boxes": cxcywh, "size": torch.tensor([h, w])}, grid, strides, dc.cache_region_grow)
        n, r = sum(a * b for a, b in grid), int(region.sum())
        stored.append(r + min(n - r, dc.teacher_cache_background + len(grid)))
    scales = d * 4 if dc.teacher_cache_dtype == "int8" else 0
    return np.full(len(dataset), int(np.mean(stored) * (d * per_value + 8)) + scales, dtype=np.int64)


def _tokens(dataset: CocoDetection, size: int, strides: tuple[int, ...], layout: str, canvas_tokens: int) -> np.ndarray:
    """Memory tokens of every image at one view size: the canvas's, or (image layout) the image's own
    level grids, ceil(side / stride) each way."""
    if layout == "canvas":
        return np.full(len(dataset), canvas_tokens, dtype=np.int64)
    index = dataset.index
    dims = np.array([longest_side_dims(int(w), int(h), size) for w, h in zip(index.widths, index.heights)])
    w, h = dims[:, 0:1], dims[:, 1:2]
    s = np.array(strides)[None]
    return ((-(-h // s)) * (-(-w // s))).sum(1)


def image_grids(sizes: list[tuple[int, int]], strides: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Each image's own level grids (rows, columns) from its (h, w): ceil(side / stride), a stride-2
    convolution's arithmetic at every level."""
    return [[(-(-h // s), -(-w // s)) for s in strides] for h, w in sizes]
