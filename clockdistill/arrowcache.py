"""Node-local Arrow caches shared by every trial on a node: built once, read memory-mapped.

A cache file is an Arrow IPC file named by a hash of everything its contents depend on, so a
changed input gets a new file and never a stale one. The first process that needs a file builds it
under an exclusive lock (the others wait, then map the finished file); it is written to a temporary
name and renamed into place, so a crash mid-build leaves no half file behind. A caller that cannot
wait (a trial whose time is better spent training) skips a file another process is building and
picks it up later. Readers map the file: the pages live once in the OS page cache however many
trials read them.

Binary columns hold raw little-endian arrays (fp16 features, uint8 pixels); `BinaryRows` hands out
zero-copy numpy views of them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

CACHE_ENV = "CLOCKDISTILL_CACHE_DIR"


def cache_root(configured: str = "") -> Path:
    """`configured` (data.cache_dir), else $CLOCKDISTILL_CACHE_DIR, else ~/.cache/clockdistill."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "clockdistill"


def content_key(parts: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of a cache's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_once(path: Path, write: Callable[[Path], None], wait: bool = True) -> bool | None:
    """Make sure `path` exists: `write(tmp_path)` builds it unless another process has. Returns True
    when this call built the file, False when it was there (or another process finished it while
    this one waited), None when another process is building it and `wait` is False."""
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        t0 = time.perf_counter()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            if path.is_file():
                waited = time.perf_counter() - t0
                if waited > 1:
                    log.info("waited %.1fs for another process to build %s", waited, path.name)
                return False
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class BatchWriter:
    """Streams record batches into an Arrow IPC file (the schema's metadata goes in the file)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self.schema = schema

    def write(self, columns: dict[str, list]) -> None:
        self._writer.write_batch(
            pa.record_batch([pa.array(columns[f.name], f.type) for f in self.schema], schema=self.schema)
        )

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def open_mapped(path: Path) -> pa.Table:
    """The whole file as a table whose buffers point into a read-only memory map."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class BinaryRows:
    """Zero-copy numpy views of the rows of a binary column (over every chunk of a mapped table)."""

    def __init__(self, column: pa.ChunkedArray, dtype: np.dtype | str):
        self.dtype = np.dtype(dtype)
        self._chunks = []  # (offsets, data buffer) per chunk
        self._where = []  # row -> (chunk, row in chunk)
        for c, chunk in enumerate(column.chunks):
            _, offsets, data = chunk.buffers()
            offs = np.frombuffer(offsets, dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
            self._chunks.append((offs, data))
            self._where += [(c, r) for r in range(len(chunk))]

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, row: int) -> np.ndarray:
        c, r = self._where[row]
        offs, data = self._chunks[c]
        start, end = int(offs[r]), int(offs[r + 1])
        return np.frombuffer(data, dtype=self.dtype, count=(end - start) // self.dtype.itemsize, offset=start)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def chunked(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
