"""The compact teacher cache (`distill.teacher_cache_memory: sampled`): what the memory terms read.

The memory terms weight each token by the location mask M and the scale mask S (distill/masks.py):
every token inside a ground-truth box (grown, Gaussian fall-off) counts with its own weight, and the
background as a whole counts as the mean over its tokens, per level. So a row keeps

    region      every token of the boxes grown by `teacher_cache_region_grow` (default: the run's own
                mask's growth, 1 for box masks; a superset of M > 0 for any box mask and any Gaussian
                mask up to that growth), in full;
    background  a fixed random sample of the other valid tokens, `teacher_cache_background` per image
                and view split over the levels by their size (at least one each), each weighted by
                (that level's background tokens) / (its sampled ones);

and a token weight w per stored token (1 in the region). The terms multiply each token's error by
w, zero elsewhere: the foreground term is exact, the background term's expectation over the sample
is the exact term (an unbiased Horvitz-Thompson sum per level), and FitNet's mean too; with the sample
as large as the background, exact. The scale-free weights (normalize: teacher / channel) divide by
the same weighted statistics: a ratio of unbiased sums.

Values are fp16, or int8 with a per-channel scale per row (max |value| / 127 over the row's stored
tokens: at most half a step, 1/254 of the channel's largest value, of rounding error per value).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from clockdistill.distill.masks import memory_masks


def region_mask(
    target: dict, grid: list[tuple[int, int]], strides: tuple[int, ...], grow: float, canvas_hw=None, padding=None
) -> Tensor:
    """(N,) bool over one image's tokens (levels concatenated, row-major): inside a GT box grown by
    `grow` (the Gaussian mask's growth). `grid` the levels' (rows, cols); on the image's own grid
    (canvas_hw None) every level spans rows x stride pixels, as on a batch canvas padded to a multiple
    of the strides; on a fixed canvas, `canvas_hw` and the row's `padding` (N,) as the live run has."""
    device = target["boxes"].device
    n = sum(h * w for h, w in grid)
    pad = torch.zeros(1, n, dtype=torch.bool, device=device) if padding is None else padding[None]
    level_hw = None if canvas_hw is not None else [(h * s, w * s) for (h, w), s in zip(grid, strides)]
    m, _ = memory_masks([target], canvas_hw or level_hw[0], grid, pad, "gaussian", grow, False, level_hw)
    return (m[0] > 0) & ~pad[0]


def background_sample(
    region: np.ndarray, valid: np.ndarray, grid: list[tuple[int, int]], k: int, key: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored token indices (sorted) and their weights: every region token at weight 1, and per level
    a uniform sample without replacement of its background (valid, outside the region) of
    round(k * its share of the background) tokens (at least one where it has any), each at weight
    (background tokens) / (sampled ones). Drawn from a generator seeded by `key` (image, size, view):
    the same sample in every trial and epoch."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(key, dtype=np.int64).tobytes()))
    background = valid & ~region
    total = int(background.sum())
    idx, weights, start = [np.flatnonzero(region)], [np.ones(int(region.sum()), dtype=np.float32)], 0
    for h, w in grid:
        level = np.flatnonzero(background[start : start + h * w]) + start
        start += h * w
        if len(level) == 0:
            continue
        take = min(len(level), max(1, round(k * len(level) / max(total, 1))))
        chosen = rng.choice(level, size=take, replace=False)
        idx.append(chosen)
        weights.append(np.full(take, len(level) / take, dtype=np.float32))
    idx_all, w_all = np.concatenate(idx), np.concatenate(weights)
    order = np.argsort(idx_all, kind="stable")
    return idx_all[order].astype(np.int32), w_all[order]


def quantize(values: Tensor, dtype: str) -> tuple[bytes, bytes]:
    """(K, D) stored values -> (their bytes, per-channel scales' bytes: empty for fp16)."""
    if dtype == "fp16":
        return values.to("cpu", torch.float16).contiguous().numpy().tobytes(), b""
    x = values.float().cpu()
    scale = (x.abs().amax(0) / 127).clamp(min=1e-12)  # (D,)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return q.contiguous().numpy().tobytes(), scale.numpy().astype(np.float32).tobytes()


def dequantize(raw: np.ndarray, scales: np.ndarray | None, d: int) -> np.ndarray:
    """Stored values (K, D) as float32."""
    x = raw.reshape(-1, d).astype(np.float32)
    return x * scales[None] if scales is not None else x


def place_rows(
    own: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]] | None]],
    shapes: list[tuple[int, int]],
    d: int,
) -> tuple[Tensor, Tensor]:
    """Dense (B, N, D) teacher memory and (B, N) token weights of a batch from its rows' stored tokens
    (indices, weights, values, and the row's own grid, or None when its indices are the batch's):
    each own-grid token (level, y, x) at the same (y, x) of the batch's level `shapes`."""
    n = sum(h * w for h, w in shapes)
    starts = np.cumsum([0] + [h * w for h, w in shapes])[:-1]
    widths = np.array([w for _, w in shapes])
    mem = np.zeros((len(own), n, d), dtype=np.float32)
    weight = np.zeros((len(own), n), dtype=np.float32)
    for b, (idx, w, values, grid) in enumerate(own):
        if grid is not None:
            own_starts = np.cumsum([0] + [h * w_ for h, w_ in grid])
            level = np.searchsorted(own_starts, idx, side="right") - 1
            local = idx - own_starts[level]
            own_w = np.array([w_ for _, w_ in grid])[level]
            idx = starts[level] + (local // own_w) * widths[level] + local % own_w
        mem[b, idx] = values
        weight[b, idx] = w
    return torch.from_numpy(mem), torch.from_numpy(weight)
