"""The teacher exchange of a sweep (distill.teacher_share: node): the trials on one node that train on
the same batch at the same time run the teacher once between them (clockdistill/distill/exchange.py).

One small actor per sweep, the hub, created by the driver (it ends with the driver), keeps for the
last `window` keys who claimed them and, once published, a reference to the output in Ray's object
store. The trial that claims a key computes the output (the teacher on its own device), puts it into
the object store and publishes the reference; its peers wait for it and read it from the node's shared
memory. Keys carry the node's id, so trials never pull teacher outputs across the network (a forward
is cheaper than that transfer).

Faults cost time, never a number: a trial that waited `wait_s` in vain (the peer that claimed the
key died), whose output's owner ended before it read it, or whose hub is gone computes the output
itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import RayError

from clockdistill.distill.exchange import to_device, to_host

log = logging.getLogger(__name__)

WAIT_S = 120.0  # how long a trial waits for a peer's teacher output (a 1333-pixel COCO forward on one CPU thread: 24 s)
WINDOW = 64  # keys the hub remembers: a trial up to ~20 steps behind its peers still finds their outputs


def hub_name(sweep: str) -> str:
    return f"clockdistill-teacher-exchange:{sweep}"


@ray.remote(num_cpus=0)
class ExchangeHub:
    """Who computes which teacher output, and where the published ones are (never the outputs)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.entries: OrderedDict[str, asyncio.Future] = OrderedDict()
        self.counts = {"computed": 0, "taken": 0, "timed_out": 0}

    def _entry(self, key: str) -> asyncio.Future:
        fut = self.entries[key] = asyncio.get_running_loop().create_future()
        while len(self.entries) > self.window:
            self.entries.popitem(last=False)
        return fut

    async def claim(self, key: str) -> bool:
        """True: the caller computes `key` and publishes it (the first to ask); False: another has."""
        if key in self.entries:
            return False
        self._entry(key)
        self.counts["computed"] += 1
        return True

    async def wait(self, key: str, wait_s: float) -> list | None:
        """[reference] of the published output, or None (forgotten, or not published within `wait_s`:
        the caller computes it)."""
        fut = self.entries.get(key)
        if fut is None:
            return None
        try:
            box = await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except asyncio.TimeoutError:
            self.counts["timed_out"] += 1
            return None
        self.counts["taken"] += 1
        return box

    async def publish(self, key: str, box: list) -> None:
        fut = self.entries.get(key) or self._entry(key)
        if not fut.done():
            fut.set_result(box)

    async def stats(self) -> dict[str, int]:
        return dict(self.counts, keys=len(self.entries))


def start_hub(sweep: str):
    """The sweep's hub (the driver holds the handle: the hub lives as long as the driver)."""
    return ExchangeHub.options(name=hub_name(sweep), get_if_exists=True).remote()


class RayExchange:
    """A trial's side of the exchange (a TeacherExchange for the Distiller). Keys are the node's own."""

    def __init__(self, hub, device, wait_s: float = WAIT_S):
        self.hub, self.device, self.wait_s = hub, device, wait_s
        self.node = ray.get_runtime_context().get_node_id()

    @classmethod
    def connect(cls, sweep: str, device) -> "RayExchange | None":
        try:
            hub = ray.get_actor(hub_name(sweep))
        except ValueError:
            log.warning("distill.teacher_share: the sweep's teacher exchange is not running: the teacher runs here")
            return None
        return cls(hub, device)

    def claim(self, key: str) -> bool:
        # no hub (gone): every output is this trial's to compute, and goes nowhere
        return self._call("claim", f"{self.node}|{key}") if self.hub is not None else True

    def publish(self, key: str, value: Any) -> None:
        if self.hub is not None:
            ref = ray.put(to_host(value))
            self.hub.publish.remote(f"{self.node}|{key}", [ref])  # no wait: the hub keeps the reference alive

    def wait(self, key: str) -> Any | None:
        box = self._call("wait", f"{self.node}|{key}", self.wait_s) if self.hub is not None else None
        if not box:
            return None
        try:
            return to_device(ray.get(box[0]), self.device)
        except RayError as exc:  # the peer that computed it ended (its object went with it)
            log.info("teacher exchange: a peer's output is gone (%s): computing it here", type(exc).__name__)
            return None

    def _call(self, method: str, *args):
        try:
            return ray.get(getattr(self.hub, method).remote(*args))
        except RayError as exc:
            log.warning("teacher exchange: the hub is gone (%s): the teacher runs here from now on", exc)
            self.hub = None
            return True if method == "claim" else None
