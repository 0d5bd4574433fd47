"""The teacher exchange of a sweep (distill.teacher_share: node): the trials on one node that train on
the same batch at the same time run the teacher once between them (clockdistill/distill/exchange.py).

One small actor per sweep, the hub, created by the driver (it ends with the driver), keeps for the
last `window` keys who claimed them and, once published, a reference to the output in Ray's object
store. The trial that claims a key computes the output (the teacher on its own device), puts it into
the object store and publishes the reference; its peers wait for it and read it from the node's shared
memory. A trial whose outputs no peer has waited for within its last 8 steps computes without
publishing (nobody would read them); a peer's wait turns its publishing back on. Keys
carry the node's id, so trials never pull teacher outputs across the network (a forward is cheaper
than that transfer).

Faults cost time, never a number: a trial that waited `wait_s` in vain (the peer that claimed the
key died), whose output's owner ended before it read it, or whose hub is gone computes the output
itself.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import RayError

from clockdistill.distill.exchange import COMPUTE, COMPUTE_AND_PUBLISH, WAIT, to_device, to_host

log = logging.getLogger(__name__)

WAIT_S = 120.0  # how long a trial waits for a peer's teacher output (a 1333-pixel COCO forward on one CPU thread: 24 s)
WINDOW = 64  # keys the hub remembers: a trial up to ~20 steps behind its peers still finds their outputs
INTEREST_STEPS = 8  # a trial publishes while a peer waited for its outputs within this many of its steps


def hub_name(sweep: str) -> str:
    return f"clockdistill-teacher-exchange:{sweep}"


class Claimant:
    """A trial as the hub sees it: how many of its steps (claims) since a peer last waited for one of
    its outputs. It publishes while that is under INTEREST_STEPS, from its first step on: trials that
    fell out of step stop paying for outputs nobody reads, and a peer's wait turns publishing on again."""

    def __init__(self):
        self.unread = 0

    def wanted(self) -> bool:
        self.unread += 1
        return self.unread <= INTEREST_STEPS


@ray.remote(num_cpus=0)
class ExchangeHub:
    """Who computes which teacher output, and where the published ones are (never the outputs)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.entries: OrderedDict[str, asyncio.Future] = OrderedDict()
        self.owner: dict[str, str] = {}  # key -> the trial that claimed it
        self.trials: dict[str, Claimant] = {}
        self.counts = {"computed": 0, "taken": 0, "timed_out": 0}

    async def claim(self, trial: str, keys: list[str]) -> list[int]:
        """Per key: WAIT (another trial computes it), COMPUTE_AND_PUBLISH, or COMPUTE (no peer has
        waited for this trial's outputs lately: they would go unread)."""
        me = self.trials.setdefault(trial, Claimant())
        wanted = me.wanted()
        out = []
        for key in keys:
            if key in self.entries:
                out.append(WAIT)
                continue
            fut = self.entries[key] = asyncio.get_running_loop().create_future()
            self.owner[key] = trial
            if not wanted:
                fut.set_result(None)  # a trial that asks for it after all computes its own
            self.counts["computed"] += 1
            out.append(COMPUTE_AND_PUBLISH if wanted else COMPUTE)
        while len(self.entries) > self.window:
            key, _ = self.entries.popitem(last=False)
            self.owner.pop(key, None)
        return out

    async def wait(self, key: str, wait_s: float) -> list | None:
        """[reference] of the published output, or None (forgotten, not published, or not within
        `wait_s`: the caller computes it). Asking makes the trial that claimed it publish again."""
        fut = self.entries.get(key)
        if fut is None:
            return None
        owner = self.trials.get(self.owner.get(key, ""))
        if owner is not None:
            owner.unread = 0
        try:
            box = await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except asyncio.TimeoutError:
            self.counts["timed_out"] += 1
            return None
        if box is not None:
            self.counts["taken"] += 1
        return box

    async def publish(self, key: str, box: list) -> None:
        fut = self.entries.get(key)
        if fut is not None and not fut.done():
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
        ctx = ray.get_runtime_context()
        self.node, self.me = ctx.get_node_id(), uuid.uuid4().hex

    @classmethod
    def connect(cls, sweep: str, device) -> "RayExchange | None":
        try:
            hub = ray.get_actor(hub_name(sweep))
        except ValueError:
            log.warning("distill.teacher_share: the sweep's teacher exchange is not running: the teacher runs here")
            return None
        return cls(hub, device)

    def claim(self, keys: list[str]) -> list[int]:
        # no hub (gone): every output is this trial's to compute, and goes nowhere
        if self.hub is not None:
            claims = self._call("claim", self.me, [f"{self.node}|{k}" for k in keys])
            if claims is not None:
                return claims
        return [COMPUTE] * len(keys)

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
            return None
