"""Before any trial starts: is the sweep's storage_path shared by every node of the cluster?

Tune checkpoints and results go to storage_path from whichever node runs a trial, and a retried
trial resumes on another node from there; a path that exists on one node only (a local disk) or
that some node cannot write would lose results later, at the worst moment. So each alive node
writes a probe file, then each node must read every other node's probe: one round trip of
zero-CPU tasks pinned to each node, a few seconds at sweep start.
"""

from __future__ import annotations

import logging
import uuid

from clockdistill.checkpoint import storage_filesystem
from sweeps.tune.console import short_path
from sweeps.tune.spec import SpecError

log = logging.getLogger(__name__)

PROBE_DIR = ".clockdistill-preflight"


def _write_probe(storage: str, run: str, node: str) -> str | None:
    try:
        fs, root = storage_filesystem(storage)
        folder = f"{root.rstrip('/')}/{PROBE_DIR}/{run}"
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/{node}") as out:
            out.write(node.encode())
        return None
    except Exception as exc:  # noqa: BLE001 - reported per node
        return f"{type(exc).__name__}: {exc}"


def _read_probes(storage: str, run: str, nodes: list[str]) -> str | None:
    try:
        fs, root = storage_filesystem(storage)
        folder = f"{root.rstrip('/')}/{PROBE_DIR}/{run}"
        missing = []
        for node in nodes:
            try:
                with fs.open_input_stream(f"{folder}/{node}") as src:
                    if src.read().decode() != node:
                        missing.append(node[:8])
            except (FileNotFoundError, OSError):
                missing.append(node[:8])
        return f"cannot see the probe files of node(s) {', '.join(missing)}" if missing else None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def check_storage(storage: str, timeout_s: float = 120.0) -> int:
    """Raise SpecError naming the node and the reason unless every alive node can write
    `storage` and read what every other node wrote there. Returns the number of nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ids = [n["NodeID"] for n in nodes]
    where = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    run = uuid.uuid4().hex[:12]
    write = ray.remote(num_cpus=0, max_retries=0)(_write_probe)
    read = ray.remote(num_cpus=0, max_retries=0)(_read_probes)

    def alive_nodes() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def failures(task, args_of) -> dict[str, str]:
        """Run task(*args_of(node)) on every node; {node: error} of those that failed. A node that
        died meanwhile (a machine lost while a sweep starts or resumes) leaves the check, with a
        warning: the sweep runs on the nodes there are."""
        refs = {
            node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                *args_of(node)
            )
            for node in ids
        }
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        alive = alive_nodes()  # one look at the cluster for the whole check, not one per node
        late = [node for node, ref in refs.items() if ref in pending and node in alive]
        if late:
            raise SpecError(
                f"storage_path: node(s) {', '.join(where[n] for n in late)} did not answer the storage check "
                f"within {timeout_s:.0f} s"
            )
        errors = {}
        for node, ref in refs.items():
            try:
                error = ray.get(ref, timeout=0) if ref not in pending else None
            except ray.exceptions.RayError:
                if node in alive_nodes():  # a live node's task failed: a real error
                    raise
                alive.discard(node)
                error = None
            if node not in alive:
                log.warning("storage check: node %s died during the check; going on without it", where[node])
                ids.remove(node)
            elif error:
                errors[node] = error
        return errors

    failed = failures(write, lambda node: (storage, run, node))
    if not failed:
        failed = failures(read, lambda node: (storage, run, list(ids)))
    try:
        fs, root = storage_filesystem(storage)
        fs.delete_dir(f"{root.rstrip('/')}/{PROBE_DIR}/{run}")
    except Exception:  # noqa: BLE001 - clean-up only
        pass
    if failed:
        node, reason = next(iter(failed.items()))
        more = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
        raise SpecError(
            f"storage_path: {storage} is not shared and writable on node {where[node]}{more}: {reason}; "
            "use a path every node mounts (NFS, EFS) or an s3:// URI"
        )
    log.info("storage %s: written and read back by all %d node(s)", short_path(storage), len(ids))
    return len(ids)
