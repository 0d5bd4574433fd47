"""A Parquet index of an annotation file: one row per image, boxes and labels as list columns.

Built once per annotation file content (the file name carries a hash of the JSON bytes), reused by
every loader after that, so a sweep's trials never parse the JSON again. Categories and the count of
skipped boxes travel in the schema metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clockdistill.data.coco import parse_coco, split_paths
from clockdistill.errors import DataError

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # absolute xyxy pixels
        ("category_ids", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.bool_())),
    ]
)


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes, as hex (annotation files, checkpoint weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_path(ann_path: Path, digest: str) -> Path:
    return ann_path.parent / ".index" / f"{ann_path.stem}-{digest[:16]}.parquet"


@dataclass
class AnnotationIndex:
    """Columnar annotations of one split, with per-image slices into flat arrays."""

    image_ids: np.ndarray  # (N,) int64
    file_names: list[str]
    widths: np.ndarray  # (N,)
    heights: np.ndarray
    offsets: np.ndarray  # (N + 1,) start of each image's boxes in the flat arrays
    boxes: np.ndarray  # (M, 4) float32 absolute xyxy
    category_ids: np.ndarray  # (M,) int32
    iscrowd: np.ndarray  # (M,) bool
    categories: list[dict]
    image_dir: Path
    ann_path: Path
    source_sha256: str = ""  # of the annotation file's bytes (what keys every cache built from this split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.boxes[s:e], self.category_ids[s:e], self.iscrowd[s:e]


def build_index(root: str | Path, split: str, check_images: bool = True) -> Path:
    """Write (or reuse) the Parquet index of a split; return its path."""
    ann_path, image_dir = split_paths(root, split)
    digest = file_digest(ann_path)
    out = index_path(ann_path, digest)
    if out.is_file():
        return out
    coco = parse_coco(ann_path)
    if check_images:
        for i, img in enumerate(coco.images):
            if not (image_dir / img.file_name).is_file():
                raise DataError(f"{image_dir / img.file_name}: missing image file (images[{i}] of {ann_path})")
    table = pa.table(
        {
            "image_id": [img.id for img in coco.images],
            "file_name": [img.file_name for img in coco.images],
            "width": [img.width for img in coco.images],
            "height": [img.height for img in coco.images],
            "boxes": [img.boxes for img in coco.images],
            "category_ids": [img.category_ids for img in coco.images],
            "iscrowd": [img.iscrowd for img in coco.images],
        },
        schema=SCHEMA,
    )
    meta = {
        "categories": json.dumps(coco.categories),
        "source_sha256": digest,
        "skipped_degenerate": str(coco.skipped_degenerate),
    }
    table = table.replace_schema_metadata(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out)  # atomic: concurrent trials never read half a file
    n_boxes = sum(len(img.boxes) for img in coco.images)
    log.info("indexed %s: %d images, %d boxes -> %s", ann_path, len(coco.images), n_boxes, out)
    return out


def load_index(root: str | Path, split: str) -> AnnotationIndex:
    """The split's index, building it first when the annotation file is new or changed."""
    ann_path, image_dir = split_paths(root, split)
    path = build_index(root, split)
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    boxes_col = table["boxes"].combine_chunks()
    cats_col = table["category_ids"].combine_chunks()
    crowd_col = table["iscrowd"].combine_chunks()
    offsets = boxes_col.offsets.to_numpy().astype(np.int64)
    return AnnotationIndex(
        image_ids=table["image_id"].to_numpy(),
        file_names=table["file_name"].to_pylist(),
        widths=table["width"].to_numpy(),
        heights=table["height"].to_numpy(),
        offsets=offsets - offsets[0],
        boxes=boxes_col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4),
        category_ids=cats_col.flatten().to_numpy(zero_copy_only=False),
        iscrowd=crowd_col.flatten().to_numpy(zero_copy_only=False),
        categories=json.loads(meta[b"categories"]),
        image_dir=image_dir,
        ann_path=ann_path,
        source_sha256=meta.get(b"source_sha256", b"").decode() or file_digest(ann_path),
    )
