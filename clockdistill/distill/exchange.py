"""Teacher outputs shared by the runs that train on the same batch at the same time (lockstep).

Every trial of a sweep trains on the same images in the same order (the data order is seeded by
train.seed and the epoch, the augmentation by the image and the epoch), so K trials started together
ask the frozen teacher the same question at every step. Where no cache fits (COCO: distill/cache.py
cannot hold even one view of it in 200 GB), one of them runs the teacher and the others take its
outputs: each pays 1/K of the teacher's forward, and nothing is stored beyond a few recent batches.

A `TeacherExchange` hands out each key once: the run that claims it computes the output and publishes
it, the others wait for it. A run claims the batch's memory as its step starts and, when it is the
one, runs the teacher before its student; the others run their students meanwhile and take the memory
after. So the claims alternate between runs that are in step, and on separate devices each run pays
about 1/K of the teacher per step (a run that waited for every output would pay the whole forward in
waiting). The Distiller asks it for the teacher's memory, its
decoder outputs on the target-aware queries and on its own queries, each under a key that names the
batch exactly (the images' ids, sizes and views, the canvas, a digest of a pixel sample and, for
decoder outputs, a digest of the queries themselves): runs that are not in step, or whose queries
differ (label noise), simply compute their own. An exchange never changes a number: a shared output
is the same tensor the run would have computed.

`LocalExchange` shares between distillers in one process (tests, several students in one loop);
sweeps/tune/exchange.py shares between the trials on one node through Ray's object store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

PIXEL_STRIDE = 16  # the pixel sample of a batch's digest: every 16th row and column


class TeacherExchange(Protocol):
    """Teacher outputs by key, between runs. `claim(key)` True: this run computes the output and
    `publish`es it; False: another run has or will have published it, which `wait(key)` returns
    (None when it never comes or is gone: the run computes its own)."""

    def claim(self, key: str) -> bool: ...

    def publish(self, key: str, value: Any) -> None: ...

    def wait(self, key: str) -> Any | None: ...


def batch_key(images: Tensor, mask: Tensor, targets: list[dict]) -> str:
    """A name for the teacher's input: each image's id, size and view, the canvas, and a digest of
    every 16th pixel (so that runs whose augmentation differs never take each other's outputs)."""
    views = [(int(t["image_id"]), tuple(int(v) for v in t["size"].tolist()), int(t.get("view", 0))) for t in targets]
    sample = images[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE]
    return f"{views}|{tuple(images.shape)}|{tuple(mask.shape)}|{digest(sample, mask)}"


def digest(*tensors: Tensor | None) -> str:
    """A digest of tensors' values (one host copy of each)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_host(t).tobytes())
    return h.hexdigest()


def _host(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: carried as its bits
        return t.view(torch.int16).numpy()
    return t.numpy()


def to_host(value: Any) -> Any:
    """A teacher output (tensors in dicts, lists, tuples, dataclasses) with every tensor as a host
    numpy array tagged with its dtype: what another process reads without a copy from shared memory."""
    if isinstance(value, Tensor):
        return ("__tensor__", str(value.dtype).removeprefix("torch."), _host(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_host(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return ("__dataclass__", type(value), fields)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def to_device(value: Any, device: torch.device | str) -> Any:
    """The inverse of `to_host`: tensors again, on `device`: copied out of the shared (read-only)
    buffer once, by the copy to the accelerator or, on the CPU, by a copy of its own."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "__tensor__":
        dtype, array, device = getattr(torch, value[1]), value[2], torch.device(device)
        with warnings.catch_warnings():  # read-only: never written, copied below
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        t = t.view(dtype) if dtype == torch.bfloat16 else t
        return t.clone() if device.type == "cpu" else t.to(device)
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "__dataclass__":
        return value[1](**{k: to_device(v, device) for k, v in value[2].items()})
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class LocalExchange:
    """Shares within one process: the last `window` keys."""

    _PENDING = object()

    def __init__(self, window: int = 16):
        self.window = window
        self.values: OrderedDict[str, Any] = OrderedDict()

    def claim(self, key: str) -> bool:
        if key in self.values:
            return False
        self.values[key] = self._PENDING
        while len(self.values) > self.window:
            self.values.popitem(last=False)
        return True

    def publish(self, key: str, value: Any) -> None:
        self.values[key] = value

    def wait(self, key: str) -> Any | None:
        value = self.values.get(key)
        return None if value is None or value is self._PENDING else value
