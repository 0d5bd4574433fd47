"""Decoded images, shared by every trial on a node: one Arrow file per split and longest side.

Each row holds one image decoded and resized (uint8 H x W x 3, unflipped: a flip is an array view),
in the order of the split's index. The file is keyed by the annotation file's hash, the size and the
image files' names, sizes and modification times, and built once per node (`arrowcache.build_once`);
trials map it and never open an image file again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from clockdistill.arrowcache import (
    BatchWriter,
    BinaryRows,
    build_once,
    cache_root,
    content_key,
    human_bytes,
    open_mapped,
)
from clockdistill.data.index import AnnotationIndex
from clockdistill.data.transforms import resize_longest

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("image_id", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.binary())])
FORMAT = 1


def decoded_path(index: AnnotationIndex, size: int, cache_dir: str = "", tag: str = "") -> Path:
    """The file of a split's images at `size`; `tag` names a resize other than the longest side's."""
    stats = []
    for name in index.file_names:
        st = os.stat(index.image_dir / name)
        stats.append((name, st.st_size, st.st_mtime_ns))
    fields = {"format": FORMAT, "annotations": index.source_sha256, "size": size, "files": stats}
    key = content_key({**fields, "resize": tag} if tag else fields)
    return cache_root(cache_dir) / "decoded" / f"{index.ann_path.stem}-{size}{tag and '-' + tag}-{key}.arrow"


class DecodedImages:
    """Resized uint8 images of one split at one longest side, memory-mapped: `images[i]` is an
    (H, W, 3) read-only array for row i of the index."""

    def __init__(self, path: Path, index: AnnotationIndex):
        table = open_mapped(path)
        ids = table["image_id"].to_numpy()
        if len(ids) != len(index) or not np.array_equal(ids, index.image_ids):
            raise RuntimeError(f"{path}: rows do not match the annotation index (delete the file to rebuild it)")
        self.path = path
        self.heights = table["height"].to_numpy()
        self.widths = table["width"].to_numpy()
        self._pixels = BinaryRows(table["pixels"], np.uint8)

    def __len__(self) -> int:
        return len(self._pixels)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._pixels[i].reshape(int(self.heights[i]), int(self.widths[i]), 3)

    @classmethod
    def open_or_build(
        cls,
        index: AnnotationIndex,
        size: int,
        load_image,
        cache_dir: str = "",
        progress: bool = True,
        wait: bool = True,
        resize=resize_longest,
        tag: str = "",
    ) -> "DecodedImages | Path":
        """Map the split's decoded file at `size`, decoding every image with `load_image(i)` (a PIL
        image) first if no process on this node has. With `wait` False and another process building
        it, returns the file's path instead (to be opened once it exists)."""
        path = decoded_path(index, size, cache_dir, tag)

        def write(tmp: Path) -> None:
            writer = BatchWriter(tmp, SCHEMA)
            rows: dict[str, list] = {name: [] for name in SCHEMA.names}
            total = 0
            for i in tqdm(
                range(len(index)), desc=f"decode {index.ann_path.stem} @{size}", unit="img", disable=not progress
            ):
                arr = np.asarray(resize(load_image(i), size), dtype=np.uint8)
                for name, value in (
                    ("image_id", int(index.image_ids[i])),
                    ("height", arr.shape[0]),
                    ("width", arr.shape[1]),
                    ("pixels", arr.tobytes()),
                ):
                    rows[name].append(value)
                total += arr.nbytes
                if len(rows["image_id"]) == 256:
                    writer.write(rows)
                    rows = {name: [] for name in SCHEMA.names}
            if rows["image_id"]:
                writer.write(rows)
            writer.close()
            log.info(
                "decoded %d images of %s at longest side %d: %s in %s",
                len(index),
                index.ann_path.name,
                size,
                human_bytes(total),
                path,
            )

        if build_once(path, write, wait) is None:
            log.info("%s is being built by another process; decoding image files until it is ready", path.name)
            return path
        return cls(path, index)
