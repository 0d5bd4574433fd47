"""Teacher outputs shared by the runs that train on the same batch at the same time (lockstep).

Every trial of a sweep trains on the same images in the same order (the data order is seeded by
train.seed and the epoch, the augmentation by the image and the epoch), so K trials started together
ask the frozen teacher the same question at every step. Where no cache fits (COCO: distill/cache.py
cannot hold even one view of it in 200 GB), one of them runs the teacher and the others take its
outputs: each pays 1/K of the teacher's forward, and nothing is stored beyond a few recent batches.

A `TeacherExchange` hands out each key once: the run that claims it computes the output and publishes
it, the others wait for it. A run claims every teacher output of its batch (memory, decoder outputs)
in one call as its step starts and, when the memory is its to compute, runs the teacher before its
student; the others run their students meanwhile and take the outputs after. So the claims alternate
between runs in step, and each pays about 1/K of the teacher per step, on separate devices too (a run
that waited for every output would pay the whole forward in waiting). A run no peer has asked
anything of lately computes without publishing (alone, it pays one call per step).

Keys name the batch exactly (the images' ids, sizes and views, the canvas, a digest of a pixel
sample and, for decoder outputs, a digest of the queries themselves): runs not in step, or whose
queries differ (label noise), compute their own. An exchange never changes a number: a shared output
is the same tensor the run would have computed.

`LocalExchange` shares between distillers in one process (the tests);
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


WAIT, COMPUTE_AND_PUBLISH, COMPUTE = 0, 1, 2  # what `claim` says to do with a key


class TeacherExchange(Protocol):
    """Teacher outputs by key, between runs. `claim(keys)` says, per key: WAIT (another run computes
    it: `wait(key)` returns it, or None when it never comes or is gone, and the run computes its own),
    COMPUTE_AND_PUBLISH (this run computes it and `publish`es it for peers in step with it) or COMPUTE
    (no peer has asked for anything lately: publishing would only cost)."""

    def claim(self, keys: list[str]) -> list[int]: ...

    def publish(self, key: str, value: Any) -> None: ...

    def wait(self, key: str) -> Any | None: ...


def batch_key(images: Tensor, mask: Tensor, targets: list[dict]) -> str:
    """A name for the teacher's input: each image's id, size and view, the canvas, and a digest of
    every 16th pixel (so that runs whose augmentation differs never take each other's outputs). The
    padding mask is named by the sizes and the canvas (each image at the top left): not read."""
    sizes = torch.stack([t["size"] for t in targets]).tolist() if targets else []  # one host copy
    views = [(int(t["image_id"]), tuple(hw), int(t.get("view", 0))) for t, hw in zip(targets, sizes)]
    sample = images[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE]
    return f"{views}|{tuple(images.shape)}|{tuple(mask.shape)}|{digest(sample)}"


def digest(*tensors: Tensor | None) -> str:
    """A digest of tensors' values (one host copy of each)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
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
    """Shares within one process: the last `window` keys (always published)."""

    _PENDING = object()

    def __init__(self, window: int = 16):
        self.window = window
        self.values: OrderedDict[str, Any] = OrderedDict()

    def claim(self, keys: list[str]) -> list[int]:
        out = []
        for key in keys:
            out.append(WAIT if key in self.values else COMPUTE_AND_PUBLISH)
            self.values.setdefault(key, self._PENDING)
        while len(self.values) > self.window:
            self.values.popitem(last=False)
        return out

    def publish(self, key: str, value: Any) -> None:
        self.values[key] = value

    def wait(self, key: str) -> Any | None:
        value = self.values.get(key)
        return None if value is None or value is self._PENDING else value


class SharedOutputs:
    """A Distiller's side of an exchange: this step's batch name and claims, and the epoch's counts of
    teacher outputs computed here and taken from a peer."""

    def __init__(self, exchange: TeacherExchange, teacher_id: str):
        self.exchange, self.teacher_id = exchange, teacher_id
        self.batch, self.claims, self.kept = "", {}, {}
        self.computed = self.taken = 0

    def begin(self, images: Tensor, mask: Tensor, targets: list[dict], parts: list[tuple[str, str]]) -> None:
        """A new step: names its batch and claims its `parts` ((name, detail) pairs) in one call."""
        self.batch, self.kept = batch_key(images, mask, targets), {}
        keys = [self.key(*p) for p in parts]
        self.claims = dict(zip(keys, self.exchange.claim(keys))) if keys else {}

    def key(self, part: str, detail: str = "") -> str:
        return f"{part}|{self.teacher_id}|{self.batch}|{detail}"

    def is_mine(self, part: str, detail: str = "") -> bool:
        return self.claims.get(self.key(part, detail), WAIT) != WAIT

    def get(self, part: str, compute, detail: str = "", keep: bool = False) -> Any:
        """`compute()`'s output (published when peers want it), or the peer's when it is theirs; with
        `keep`, computed ahead of its use and held for the step's later `get`."""
        key = self.key(part, detail)
        if key in self.kept:
            return self.kept.pop(key)
        claim = self.claims.pop(key, None)
        if claim is None:  # not claimed when the step began
            claim = self.exchange.claim([key])[0]
        if claim == WAIT:
            value = self.exchange.wait(key)
            if value is not None:
                self.taken += 1
                return value
            claim = COMPUTE
        value = compute()
        self.computed += 1
        if claim == COMPUTE_AND_PUBLISH:
            self.exchange.publish(key, value)
        if keep:
            self.kept[key] = value
        return value

    def share_taken(self) -> float:
        """The part of the outputs since the last call that a peer computed."""
        share = self.taken / max(self.computed + self.taken, 1)
        self.computed = self.taken = 0
        return share
