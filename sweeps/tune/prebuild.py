"""Before the first trial: build the node caches on every node that can run a trial, and measure the
student's latency there while nothing else runs when an objective needs it (clockdistill/latency.py).

With `data.decoded_cache` or `distill.teacher_cache` on, the first trial on each node would spend
its start-up decoding every image and running the teacher over the data set while its sweep waits
on it. Instead the driver runs one task per such node (with a trial's resources, pinned to the
node) that builds the files for the spec's base config; trials then only map them. Settings that
change a cache's key inside the search space (query groups, random queries, ...) still get their
files from the first trial that needs them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from sweeps.tune.spec import SweepSpec, spec_from_json, spec_to_json

log = logging.getLogger(__name__)


def _wants_caches(cfg) -> bool:
    return cfg.data.decoded_cache or cfg.distill.teacher_cache != "off"


def needs_node_caches(spec: SweepSpec) -> bool:
    from sweeps.tune.trial import trial_config

    return _wants_caches(trial_config(spec, {}, Path(tempfile.gettempdir()) / "clockdistill-prebuild")) or (
        spec.needs_latency
    )


def _build(spec_json: str) -> dict:
    import torch

    from clockdistill.engine import select_device
    from clockdistill.latency import node_latency_ms
    from clockdistill.models.build import build_detector
    from sweeps.tune.trial import trial_config

    t0 = time.perf_counter()
    spec = spec_from_json(spec_json)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    cfg = trial_config(spec, {}, Path(tempfile.gettempdir()) / "clockdistill-prebuild")
    done: dict = {}
    if spec.needs_latency:  # first, while nothing else runs on the node
        model = build_detector(cfg.model, cfg.model.num_classes)
        done["latency_ms"], _ = node_latency_ms(model, cfg, select_device(cfg.train.device), "before the sweep, alone")
    if _wants_caches(cfg):
        done["teacher_cache"] = _build_caches(cfg)
    return {"seconds": time.perf_counter() - t0, **done}


def _build_caches(cfg) -> str:
    from clockdistill.distill.cache import prepare_teacher_cache
    from clockdistill.distill.teacher import FrozenTeacher
    from clockdistill.engine import build_datasets, select_device

    decoded = cfg.data.decoded_cache
    # the decoded images are built here, waiting for them (a trial would not wait)
    cfg = cfg.updated({"train.progress": False, "data.decoded_cache": False})
    train, val = build_datasets(cfg)
    if decoded:
        for ds in (train, val):
            ds.use_decoded_cache(cfg.data.cache_dir, progress=False, wait=True)
    device = select_device(cfg.train.device)
    teacher = FrozenTeacher.load(cfg.distill.teacher, device, cfg.distill.teacher_padding)
    cache = prepare_teacher_cache(cfg, teacher, train, device, wait=True)
    return str(cache.path) if cache is not None else ""


def prebuild_node_caches(spec: SweepSpec, timeout_s: float = 3600.0) -> int:
    """Build the base config's caches on every alive node whose resources fit one trial (one
    worker of a data-parallel trial). Returns the number of nodes; a node that fails only logs a
    warning (its first trial builds or falls back to the live teacher instead)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    r = spec.resources
    nodes = [
        n
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) >= r.cpu and n["Resources"].get("GPU", 0) >= r.gpu
    ]
    task = ray.remote(max_retries=0)(_build)
    t0 = time.perf_counter()
    refs = {
        n["NodeManagerAddress"] + "/" + n["NodeID"][:8]: task.options(
            num_cpus=r.cpu, num_gpus=r.gpu, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(spec_to_json(spec))
        for n in nodes
    }
    for where, ref in refs.items():
        try:
            done = ray.get(ref, timeout=timeout_s)
            log.info("node caches ready on %s (%.1f s)", where, done["seconds"])
        except Exception as exc:  # noqa: BLE001 - trials build or fall back themselves
            log.warning(
                "node caches could not be built on %s (%s); its first trial builds them",
                where,
                str(exc).splitlines()[-1][:300],
            )
    log.info("node caches: %d node(s) in %.1f s, before the first trial", len(refs), time.perf_counter() - t0)
    return len(refs)
