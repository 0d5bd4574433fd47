"""The teacher-output cache: the teacher's work for a sweep done once per image and view.

Every trial of a sweep distils from the same frozen teacher on the same images, so with a fixed set
of views (each training size, flipped or not) and deterministic target-aware queries the teacher's
outputs are the same in every trial and every epoch. The cache holds, per (image, size, flip):

    memory    (N, D) fp16   the encoder memory (memory + positional encoding when memory.with_pos),
                            for the memory methods: nearly all of the cache's size
    queries   (L, K, C + 4) fp32   logits and boxes of every teacher decoder layer on the image's
                            target-aware queries (its G groups of GT queries, then the random ones)
    default   (L, Q, C + 4) fp32   the same on the teacher's own queries (vanilla KD's matching)

The decoder outputs stay fp32: they are a few KB per image, and a student initialised from the
teacher sits within fp16's rounding step (2.4e-4 of the image) of the teacher's boxes, where fp16
would make the box terms measure rounding instead of the student.

in one Arrow file per teacher and setting, built once per node and read memory-mapped by every
trial on it (`arrowcache`). Its rows are laid out one of two ways:

    canvas    a fixed canvas (`data.pad_to: max_size`, or the square recipe): each row the whole
              canvas's tokens, read as they are
    image     batches padded to their largest image (`data.pad_to: batch`, any aspect ratio): each row
              the image's own level grids (its `grid` column: rows and columns per level), placed
              into each batch's padded layout when read. This needs a teacher whose outputs for an
              image do not depend on its batch's padding (`distill.teacher_padding: invariant`, the
              families with a padding mask, models/invariance.py) and batches padded to a multiple of
              its largest stride (`data.pad_multiple`), so that its level masks mark each image's grid

It needs no random query noise; its size is computed and logged before it is built, and a cache over
`distill.teacher_cache_max_gb` is not built (live teacher).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm import tqdm

from clockdistill.arrowcache import (
    BatchWriter,
    BinaryRows,
    build_once,
    chunked,
    human_bytes,
    open_mapped,
)
from clockdistill.config.methods import METHODS
from clockdistill.config.sections import Config
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.transforms import collate
from clockdistill.distill.cache_plan import (
    CachePlan,
    image_grids,
    image_layout,
    plan_cache,
)
from clockdistill.distill.compact import background_sample, dequantize, place_rows, quantize, region_mask
from clockdistill.distill.queries import TargetQueryBuilder
from clockdistill.errors import ConfigError
from clockdistill.models.common import decoder_layers
from clockdistill.models.invariance import pad_multiple_for

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("size", pa.int32()),
        ("view", pa.int8()),
        ("grid", pa.binary()),
        ("tokens", pa.binary()),
        ("weights", pa.binary()),
        ("scales", pa.binary()),
        ("memory", pa.binary()),
        ("queries", pa.binary()),
        ("default", pa.binary()),
    ]
)
DTYPES = {
    "grid": np.int32,
    "tokens": np.int32,
    "weights": np.float32,
    "scales": np.float32,
    "memory": np.float16,
    "queries": np.float32,
    "default": np.float32,
}
PAD_BOX = (0.5, 0.5, 0.1, 0.1)  # what padded query slots hold (never used: zero weight, but finite)


def cache_blockers(cfg: Config, teacher=None) -> list[str]:
    """Why this run cannot read teacher outputs from a cache (empty: it can). `teacher` (the
    FrozenTeacher) when known: whether it can serve batches padded to their largest image."""
    dc, reasons = cfg.distill, []
    if not METHODS[dc.method].uses_teacher:
        reasons.append(f"distill.method: {dc.method} runs no teacher")
    if METHODS[dc.method].detrdistill and (dc.detrdistill.feature or dc.detrdistill.query_prior):
        reasons.append(
            "distill.method: detrdistill's feature and query-prior parts read the teacher's encoder input, "
            "query embeddings and queries, which the cache does not hold"
        )
    square = cfg.data.resize == "square"
    if image_layout(cfg):
        if dc.teacher_padding != "invariant":
            reasons.append(
                "distill.teacher_padding: 'reference' makes an image's teacher outputs depend on its batch's padding "
                "(data.pad_to: batch); set distill.teacher_padding=invariant or data.pad_to=max_size"
            )
        elif teacher is not None and not teacher.padding_invariant:
            reasons.append(
                f"model.arch: the teacher's {teacher.cfg.arch} encoder has no padding mask, so its outputs depend on "
                "the batch's padding (data.pad_to: batch); set data.pad_to=max_size"
            )
        elif teacher is not None and cfg.data.pad_multiple % pad_multiple_for(teacher.detector):
            m = pad_multiple_for(teacher.detector)
            reasons.append(
                f"data.pad_multiple: {cfg.data.pad_multiple} is not a multiple of the teacher's largest stride {m}, "
                f"so its level masks do not mark each image's own grid; set data.pad_multiple={m}"
            )
    if square and set(cfg.data.train_sizes) - {cfg.data.max_size}:
        reasons.append(
            "data.train_sizes: the square recipe scales each training batch to one of them after loading, and the "
            "cache holds max_size views only; set data.train_sizes=[] for a cached run"
        )
    if (
        dc.teacher_cache_memory == "sampled"
        and dc.memory.mask == "gaussian"
        and dc.memory.gaussian_grow > dc.cache_region_grow
    ):
        reasons.append(
            f"distill.memory.gaussian_grow: {dc.memory.gaussian_grow:g} reaches beyond the region a sampled cache "
            f"stores in full (distill.teacher_cache_region_grow={dc.cache_region_grow:g}); raise that"
        )
    if dc.uses_target_queries and (dc.logit.label_noise > 0 or dc.logit.box_noise > 0):
        reasons.append("distill.logit.label_noise/box_noise: noisy queries change the teacher's input every step")
    return reasons


class TeacherCache:
    """A mapped cache file: batches of teacher outputs for the targets of a batch."""

    def __init__(self, path: Path):
        table = open_mapped(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        self.path, self.parts = path, meta["parts"].split(",")
        self.layers, self.num_classes = int(meta["layers"]), int(meta["num_classes"])
        self.d_model, self.tokens = int(meta["d_model"]), int(meta["tokens"])
        self.layout = meta.get("layout", "canvas")
        self.sampled = meta.get("memory", "full") == "sampled"
        columns = self.parts + (["grid"] if self.layout == "image" else [])
        if self.sampled:
            columns += ["tokens", "weights", "scales"]
        dtypes = {**DTYPES, "memory": np.int8 if meta.get("dtype") == "int8" else np.float16}
        self.groups, self.random_queries = int(meta["groups"]), int(meta["random_queries"])
        shapes = meta.get("canvas_shapes", "")
        self.canvas_shapes = [tuple(int(v) for v in hw.split("x")) for hw in shapes.split(",") if hw]
        keys = zip(
            table["image_id"].to_numpy().tolist(), table["size"].to_numpy().tolist(), table["view"].to_numpy().tolist()
        )
        self.rows = {key: row for row, key in enumerate(keys)}
        self.columns = {part: BinaryRows(table[part], dtypes[part]) for part in columns}

    def get(self) -> "TeacherCache":
        return self

    def _rows(self, targets: list[dict]) -> list[int]:
        rows = []
        for t in targets:
            key = (int(t["image_id"]), int(max(t["size"].tolist())), int(t.get("view", 0)))
            if key not in self.rows:
                raise KeyError(
                    f"teacher cache {self.path.name} has no entry for image {key[0]} at size {key[1]}, view {key[2]}"
                )
            rows.append(self.rows[key])
        return rows

    def _stack(self, part: str, rows: list[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
        arr = np.stack([self.columns[part][r].reshape(shape) for r in rows])  # a copy: the map stays read-only
        return torch.from_numpy(arr).to(device, non_blocking=True).float()

    def memory(self, targets: list[dict], device: torch.device, shapes: list[tuple[int, int]] | None = None) -> Tensor:
        """(B, N, D) teacher memory (or memory + pos) of the batch (`read_memory` without weights)."""
        return self.read_memory(targets, device, shapes)[0]

    def read_memory(
        self, targets: list[dict], device: torch.device, shapes: list[tuple[int, int]] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(B, N, D) teacher memory (or memory + pos) of the batch, and the (B, N) token weights of a
        sampled cache (None: every token, weight 1). Image layout: each image's grids placed at the
        top left of the batch's level `shapes` (the teacher's at the batch's canvas), zero on the
        padding (which no term reads)."""
        rows = self._rows(targets)
        if self.layout == "canvas" and not self.sampled:
            return self._stack("memory", rows, (self.tokens, self.d_model), device), None
        if shapes is None:
            if self.layout == "image":
                raise ValueError("an image-layout teacher cache needs the batch's level shapes")
            shapes = self.canvas_shapes
        own = [self._row_tokens(row) for row in rows]
        for *_, grid in own:
            if grid is not None and any(h > H or w > W for (h, w), (H, W) in zip(grid, shapes)):
                raise ValueError(f"cached level grids {grid} do not fit the batch's {shapes}")
        mem, weight = place_rows(own, shapes, self.d_model)
        return mem.to(device, non_blocking=True), (weight.to(device, non_blocking=True) if self.sampled else None)

    def _row_tokens(self, row: int):
        """A row's (token indices, weights, values (K, D) float32, own grid or None)."""
        grid = None
        if self.layout == "image":
            grid = [tuple(g) for g in self.columns["grid"][row].reshape(-1, 2).tolist()]
        values = self.columns["memory"][row]
        if not self.sampled:  # every token of the image's own grid
            n = sum(h * w for h, w in grid)
            return np.arange(n), np.ones(n, dtype=np.float32), values.reshape(n, -1), grid
        scales = self.columns["scales"][row]
        values = dequantize(values, scales if len(scales) else None, self.d_model)
        return self.columns["tokens"][row], self.columns["weights"][row], values, grid

    def default_layers(self, targets: list[dict], device: torch.device) -> list[dict[str, Tensor]]:
        """The teacher's predictions on its own queries, per decoder layer (first to last)."""
        rows = self._rows(targets)
        x = self._stack("default", rows, (self.layers, -1, self.num_classes + 4), device)  # (B, L, Q, C+4)
        return [
            {"pred_logits": x[:, layer, :, : self.num_classes], "pred_boxes": x[:, layer, :, self.num_classes :]}
            for layer in range(self.layers)
        ]

    def query_layers(
        self, targets: list[dict], n_gt: int, device: torch.device, size: int = 0
    ) -> list[dict[str, Tensor]]:
        """The teacher's predictions on the batch's target-aware queries, laid out as
        `TargetQueryBuilder.sample` lays them out (G groups of n_gt slots, then the random queries),
        per decoder layer, `size` slots at least. Padded slots hold zero logits and a dummy box."""
        G, R, C, L = self.groups, self.random_queries, self.num_classes, self.layers
        K = max(G * n_gt + R, size)
        out = torch.zeros(len(targets), L, K, C + 4, device=device)
        out[..., C:] = torch.tensor(PAD_BOX, device=device)
        for b, (t, row) in enumerate(zip(targets, self._rows(targets))):
            n = len(t["labels"])
            slots = [g * n_gt + j for g in range(G) for j in range(n)] + [G * n_gt + r for r in range(R)]
            cached = torch.tensor(self.columns["queries"][row].reshape(L, len(slots), C + 4), device=device)
            out[b, :, slots] = cached
        return [{"pred_logits": out[:, layer, :, :C], "pred_boxes": out[:, layer, :, C:]} for layer in range(L)]


class PendingTeacherCache:
    """A cache file another process is building: `get()` is None until it exists (checked at most
    every `every_s` seconds), then the mapped TeacherCache."""

    def __init__(self, path: Path, every_s: float = 5.0):
        self.path, self.every_s, self._next = path, every_s, 0.0

    def get(self) -> "TeacherCache | None":
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        if not self.path.is_file():
            return None
        log.info("teacher cache %s is ready; reading it from now on", self.path.name)
        return TeacherCache(self.path)


@torch.no_grad()
def write_cache(
    tmp: Path,
    plan: CachePlan,
    cfg: Config,
    teacher,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int,
    progress: bool = True,
) -> None:
    """One teacher pass over every (image, view) of `dataset`, written as the plan's cache file."""
    dc, C = cfg.distill, teacher.num_classes
    builder = TargetQueryBuilder(C, [teacher.cfg.d_model], dc.logit).to(device) if "queries" in plan.parts else None
    meta = {
        "parts": ",".join(plan.parts),
        "layers": str(teacher.cfg.dec_layers),
        "num_classes": str(C),
        "d_model": str(teacher.cfg.d_model),
        "groups": str(dc.logit.groups),
        "random_queries": str(dc.logit.random_queries),
        "tokens": "0",
        "layout": plan.layout,
        "memory": plan.memory,
        "dtype": cfg.distill.teacher_cache_dtype if plan.memory == "sampled" else "fp16",
    }
    writer = None
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp)
    bar = tqdm(total=plan.rows, desc="teacher cache", unit="img", disable=not progress)
    for size, flip in plan.views:
        for idx in chunked(range(len(dataset)), batch_size):
            items = [dataset.view_item(i, flip, size) for i in idx]
            images, mask, targets = collate(items, pad_to=cfg.data.canvas, multiple=cfg.data.pad_multiple)
            images, mask = images.to(device), mask.to(device)
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with amp:
                mem = teacher.encode(images, mask)
            cols: dict[str, list[Any]] = {
                "image_id": [t["image_id"] for t in targets],
                "size": [size] * len(idx),
                "view": [flip] * len(idx),
                "grid": [b""] * len(idx),
                "tokens": [b""] * len(idx),
                "weights": [b""] * len(idx),
                "scales": [b""] * len(idx),
                "memory": [b""] * len(idx),
                "queries": [b""] * len(idx),
                "default": [b""] * len(idx),
            }
            if "memory" in plan.parts:
                t = mem.memory + mem.pos if dc.memory.with_pos else mem.memory
                cols.update(_memory_columns(plan, cfg, t, mem, targets, tuple(images.shape[-2:]), size, flip))
                meta["tokens"] = str(t.shape[1])
                meta["canvas_shapes"] = ",".join(f"{h}x{w}" for h, w in mem.spatial_shapes)
            if "queries" in plan.parts:
                qs = builder.sample(targets, device)
                with amp:
                    layers = decoder_layers(teacher.decode(mem, **builder.embed(qs, teacher.cfg.d_model)))
                x = torch.stack(
                    [torch.cat([o["pred_logits"].float(), o["pred_boxes"].float()], -1) for o in layers], 1
                )  # (B, L, K, C+4)
                n_max = max(len(t["labels"]) for t in targets)
                G, R = dc.logit.groups, dc.logit.random_queries
                cols["queries"] = []
                for b, t in enumerate(targets):
                    slots = [g * n_max + j for g in range(G) for j in range(len(t["labels"]))] + [
                        G * n_max + r for r in range(R)
                    ]
                    cols["queries"].append(_bytes(x[b][:, slots], torch.float32))
            if "default" in plan.parts:
                with amp:
                    layers = decoder_layers(teacher.predict_default(mem))
                x = torch.stack([torch.cat([o["pred_logits"].float(), o["pred_boxes"].float()], -1) for o in layers], 1)
                cols["default"] = [_bytes(xb, torch.float32) for xb in x]
            if writer is None:
                writer = BatchWriter(tmp, SCHEMA.with_metadata(meta))
            writer.write(cols)
            bar.update(len(idx))
    bar.close()
    if writer is None:
        writer = BatchWriter(tmp, SCHEMA.with_metadata(meta))
    writer.close()


def _memory_columns(plan: CachePlan, cfg: Config, t: Tensor, mem, targets: list[dict], canvas_hw, size: int, flip: int):
    """The memory columns of a batch's rows: every token (canvas layout: the canvas's; image layout:
    the image's own grids), or (sampled) the stored tokens, their weights and values (distill/compact.py)."""
    dc, n = cfg.distill, len(targets)
    cols: dict[str, list[bytes]] = {}
    grids: list = [None] * n
    if plan.layout == "image":
        grids = image_grids([tuple(tg["size"].tolist()) for tg in targets], plan.strides)
        cols["grid"] = [np.asarray(g, dtype=np.int32).tobytes() for g in grids]
        rows = [own_tokens(x, mem.spatial_shapes, g) for x, g in zip(t, grids)]
    else:
        rows = list(t)
    if plan.memory == "full":
        cols["memory"] = [_bytes(x, torch.float16) for x in rows]
        return cols
    cols.update(tokens=[], weights=[], scales=[], memory=[])
    for b, (x, tg, grid) in enumerate(zip(rows, targets, grids)):
        if grid is None:  # the canvas's levels and this row's padding, as the live run has them
            pad = mem.padding_mask[b]
            region = region_mask(tg, mem.spatial_shapes, plan.strides, dc.cache_region_grow, canvas_hw, pad)
            grid, valid = mem.spatial_shapes, ~pad
        else:
            region = region_mask(tg, grid, plan.strides, dc.cache_region_grow)
            valid = torch.ones_like(region)
        key = (int(tg["image_id"]), size, flip)
        idx, w = background_sample(region.cpu().numpy(), valid.cpu().numpy(), grid, dc.teacher_cache_background, key)
        values, scales = quantize(x[torch.from_numpy(idx).long().to(x.device)], dc.teacher_cache_dtype)
        cols["tokens"].append(idx.tobytes())
        cols["weights"].append(w.tobytes())
        cols["memory"].append(values)
        cols["scales"].append(scales)
    return cols


def own_tokens(tokens: Tensor, shapes: list[tuple[int, int]], grid: list[tuple[int, int]]) -> Tensor:
    """One image's (N, D) tokens of a padded batch cut to its own level grids (top left of each)."""
    out, start = [], 0
    for (H, W), (h, w) in zip(shapes, grid):
        out.append(tokens[start : start + H * W].view(H, W, -1)[:h, :w].reshape(h * w, -1))
        start += H * W
    return torch.cat(out)


def _bytes(x: Tensor, dtype: torch.dtype) -> bytes:
    return x.detach().to("cpu", dtype).contiguous().numpy().tobytes()


def prepare_teacher_cache(
    cfg: Config, teacher, dataset: CocoDetection, device: torch.device, wait: bool = True
) -> TeacherCache | PendingTeacherCache | None:
    """The run's teacher cache (mapped; built first when no process on this node has), or None
    for the live teacher: `teacher_cache: off`, or `auto` with a reason logged. `on` raises a
    ConfigError naming the reason instead. With `wait` False and another process building the
    file, a PendingTeacherCache: the live teacher serves until the file is there."""
    mode = cfg.distill.teacher_cache
    if mode == "off":
        return None
    blockers = cache_blockers(cfg, teacher)
    if blockers:
        if mode == "on":
            raise ConfigError(f"distill.teacher_cache: on, but {blockers[0]}")
        log.info("teacher cache not used: %s", "; ".join(blockers))
        return None
    plan = plan_cache(cfg, teacher, dataset, device)
    limit = cfg.distill.teacher_cache_max_gb * 1e9
    parts = "+".join(plan.parts)
    where = (
        f"{plan.rows} entries ({len(dataset)} images x {len(plan.views)} views), {parts}, {plan.layout} layout: "
        f"{'about ' if plan.estimated else ''}{human_bytes(plan.bytes)} "
        f"({human_bytes(plan.bytes / max(plan.rows, 1))} per image and view"
        f"{', memory sampled' if plan.memory == 'sampled' else ''})"
    )
    if plan.bytes > limit:
        log.warning(
            "teacher cache would need %s > distill.teacher_cache_max_gb=%g; using the live teacher",
            where,
            cfg.distill.teacher_cache_max_gb,
        )
        return None
    if plan.path.is_file():
        log.info("teacher cache: %s, reading %s", where, plan.path)
    else:
        log.info("teacher cache: %s, building %s", where, plan.path)
    built = build_once(
        plan.path,
        lambda tmp: write_cache(tmp, plan, cfg, teacher, dataset, device, 2 * cfg.train.batch_size, cfg.train.progress),
        wait,
    )
    if built is None:
        log.info(
            "teacher cache %s is being built by another process; the live teacher serves until it is ready",
            plan.path.name,
        )
        return PendingTeacherCache(plan.path)
    return TeacherCache(plan.path)
