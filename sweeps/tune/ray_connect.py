"""Which Ray a sweep runs on, decided once and said in one line.

- RAY_ADDRESS set (by `ray job submit`, or by the user; `auto` included): that cluster. An address
  where no cluster answers is a one-line error that says what to do.
- RAY_ADDRESS unset: a Ray of the sweep's own on this machine (`address="local"`), whatever else
  runs here. A cluster started with `ray start` on this machine (cluster/local/start.sh, or a
  `ray start --head` for the dashboard) is never joined by accident: the sweep says that it runs
  beside it and how to run on it instead. The address file such a cluster leaves behind when it
  dies without `ray stop` (a crash, a killed head) changes nothing.
- A process that already runs Ray (a second sweep in one script or notebook) keeps it.
"""

from __future__ import annotations

import logging
import os
import socket

from clockdistill.errors import UserError

log = logging.getLogger("clockdistill.sweep")

DRIVER_RESOURCE = "sweep_driver"  # custom resource of the nodes that host drivers (never preemptible ones; cluster/)


def recorded_local_cluster() -> tuple[str, bool] | None:
    """(address, answering) of the cluster `ray start` last recorded on this machine, or None."""
    try:
        from ray._common.utils import get_ray_address_file

        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except (ImportError, OSError):
        return None
    if not address:
        return None
    return address, _answers(address, timeout=1.0)


def _answers(address: str, timeout: float = 5.0) -> bool:
    """Whether something accepts a TCP connection at host:port (or a URL's host and port)."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _unreachable(address: str, reason: str) -> UserError:
    return UserError(
        f"RAY_ADDRESS={address}: no Ray cluster could be reached ({reason}); start it, correct the address, "
        "or unset RAY_ADDRESS to run the sweep on a Ray of its own"
    )


def connect(**init_kwargs) -> str:
    """ray.init for a sweep driver; returns where the sweep runs, for the log."""
    import ray

    if ray.is_initialized():  # a sweep after another in the same process (a script or a notebook): reuse its Ray
        return "the Ray this process already uses"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        # Ray itself retries an address where nothing listens for minutes: ask first
        if address != "auto" and not _answers(address):
            raise _unreachable(address, "nothing answers there within 5 s")
        try:
            ray.init(address=address, **init_kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise _unreachable(
                address, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            ) from None
        return f"cluster {address}"
    recorded = recorded_local_cluster()
    if recorded and recorded[1]:
        log.warning(
            "a Ray cluster is running on this machine (%s); this sweep starts a Ray of its own beside it. "
            "To run the sweep on that cluster instead: RAY_ADDRESS=%s clockdistill sweep SPEC (or ray job submit)",
            recorded[0],
            recorded[0],
        )
    elif recorded:
        log.info(
            "ignoring %s: Ray recorded a cluster there that no longer answers (it died without ray stop)", recorded[0]
        )
    # a local Ray hosts the drivers of data-parallel trials too
    ray.init(address="local", include_dashboard=False, resources={DRIVER_RESOURCE: 100}, **init_kwargs)
    return "a local Ray of its own"
