"""Counting what reads tensor values back to the host in a piece of code: on a GPU each such read
waits for every kernel queued before it (a host sync). A CPU shows the same operations, so they can
be counted and tested here: `.item()` / `float()` / `bool()` of a tensor (aten::_local_scalar_dense),
`nonzero`, `masked_select`, indexing with a boolean mask, `unique`, and `.cpu()` / `.tolist()` /
`.numpy()`. Reads of tensors that are already on the host (the matcher's cost matrix after its one
`.cpu()`) count too: the counter cannot tell where a tensor would live on a GPU, so read its table by
source line (tests/bench/host_syncs.py)."""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# reads in the matchers of their own host copy of the costs (after the one `.cpu()`): no device sync
HOST_COPY_READS = ("numpy", "_local_scalar_dense")
MATCHERS = ("losses/matcher.py", "distill/distiller.py")
READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}
PYTHON_READS = ("cpu", "tolist", "numpy")


def _source() -> str:
    frames = [f for f in traceback.extract_stack() if "/clockdistill/" in f.filename and "host_reads" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.split('/clockdistill/')[-1]}:{f.lineno}"


class HostReads(TorchDispatchMode):
    """with HostReads() as reads: ...; reads.by_source: Counter of 'file:line op'."""

    def __init__(self):
        super().__init__()
        self.by_source: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_source.values())

    @staticmethod
    def of_host_copy(where: str) -> bool:
        """Whether a 'file:line op' entry reads a matcher's host copy of its costs (no device sync)."""
        return where.endswith(HOST_COPY_READS) and where.startswith(MATCHERS)

    @property
    def device_reads(self) -> int:
        """The reads of device values: every entry but the matchers' reads of their host copy."""
        return sum(n for where, n in self.by_source.items() if not self.of_host_copy(where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        )
        if name in READ_OPS or bool_index:
            self.by_source[f"{_source()} {name}"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patches = contextlib.ExitStack()
        for name in PYTHON_READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                self.by_source[f"{_source()} {_name}"] += 1
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, counted)
            self._patches.callback(setattr, torch.Tensor, name, real)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)
