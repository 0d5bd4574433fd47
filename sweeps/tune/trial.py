"""The trial loop, one for every kind of trial: one `run_distillation` call with the trial's knobs,
reporting once per epoch. A single-process trial reports to Tune (trainable.py); a data-parallel
trial runs this loop on every rank of a Ray Train run and rank 0 reports (ddp.py).

Each report carries every metric of the epoch (AP..., every loss term), `best_<objective>` (best so
far over the trial's life), the student's `params` (and `latency_ms` when an objective asks for it),
and the epoch's checkpoint (weights, optimizer, metadata); the first report also carries the
trial's full config (`trial_config`), built here once, which the driver writes as its MLflow params.
A retried or restored trial resumes from
its last reported checkpoint. A trial whose loss turns NaN ends with `diverged=1` and its reason
instead of raising: retrying a deterministic divergence would only repeat it.

Every report also carries the trial's own clock: `trial_wall_s` since the trial's process started
(or, in a reused process, since it finished its previous trial), `trial_overhead_s` = the part of
it not spent in training or evaluation epochs, and on the first report `startup_s` (imports, model
and data set-up, cache opening, the first checkpoint) - the waste the sweep wants small.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from clockdistill.checkpoint import damage
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.config.methods import METHODS
from clockdistill.config.sections import Config
from clockdistill.distill.run import run_distillation
from clockdistill.engine import select_device
from clockdistill.errors import TrainingDiverged
from clockdistill.latency import node_latency_ms, parameter_count
from clockdistill.metrics import EPOCH, EVAL_TIME, LATENCY, PARAMS, STARTUP, TRAIN_TIME, TRIAL_OVERHEAD, TRIAL_WALL
from clockdistill.models.build import build_detector
from sweeps.tracking.schema import (
    CONFIG_KEY,
    FAILED_KEY,
    FAILURE_REASON_KEY,
    FULL_BUDGET_KEY,
    VARIANT_KEY,
    best_key,
)
from sweeps.tune.spec import SweepSpec, spec_config

log = logging.getLogger(__name__)

_process_free_since: float | None = None  # when this (reused) process finished its previous trial

Send = Callable[[dict, "Path | None"], None]  # delivers a report row (and the epoch's checkpoint directory, or None)


def trial_clock_start() -> float:
    """When this trial's time started: its process's start, or the end of the process's last trial."""
    if _process_free_since is not None:
        return _process_free_since
    try:  # Linux: the process's start in clock ticks after boot (field 22 of /proc/self/stat)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # no /proc: count from now
        return time.time()


# the keys a trial owns (layer 7 of config/layers.py): where it writes, and that it resumes and reports every epoch
TRIAL_KEYS = {"train.resume": True, "train.eval_every": 1, "train.progress": False}


def trial_config(spec: SweepSpec, params: dict[str, Any], output_dir: str | Path) -> Config:
    """The full config of a trial (the layers of config/layers.py): the spec's config with its data,
    student and epochs, the searched variant's keys (spec `variants`), the trial's searched values
    (its dotted keys; others, such as the baseline trial's marker, are not config keys), the trial's
    own keys, and what the teacher's checkpoint implies. A trial given GPUs (resources.gpu) with
    train.device auto trains on cuda: without one it fails in one line instead of running on the CPU."""
    cfg = resolve_config(
        spec_config(spec),
        variant=spec.variants.get(params.get(VARIANT_KEY), {}),
        overrides={k: v for k, v in params.items() if "." in k},
        fixed={**TRIAL_KEYS, "train.output_dir": str(output_dir)},
        distill=True,
        teacher=spec.teacher,
    )
    if spec.resources.gpu > 0 and cfg.train.device == "auto":
        cfg = cfg.updated({"train.device": "cuda"})
    return cfg


def trial_params(cfg: Config, variant: str | None = None) -> dict[str, Any]:
    """A trial's config as its MLflow params: every dotted key but its output directory (its own
    path on its node), and the searched variant's name when it has one."""
    flat = cfg.flatten()
    flat.pop("train.output_dir", None)
    if variant is not None:
        flat[VARIANT_KEY] = variant
    return flat


def student_properties(cfg: Config, need_latency: bool) -> dict[str, float]:
    """Parameter count, and the latency when an objective needs it: from the node's latency table, where
    the sweep's prebuild step measured the spec's architecture before any trial started (latency.py)."""
    model = build_detector(cfg.model, cfg.model.num_classes)
    props = {PARAMS: float(parameter_count(model))}
    if need_latency:
        props[LATENCY], measured = node_latency_ms(model, cfg, select_device(cfg.train.device), "by a trial")
        if measured:
            log.warning(
                "latency of this trial's architecture measured by the trial itself (the sweep measured only the "
                "spec's own before it started): trials running beside it on this node may have slowed it"
            )
    return props


class EpochReporter:
    """Turns `fit`'s epoch callback into the trial's report rows: every numeric metric, the
    student's properties, best_<objective> so far, completed_full_budget and the trial clock.
    `send(row, checkpoint_dir or None)` delivers a row (to Tune, or to Ray Train's report)."""

    def __init__(self, spec: SweepSpec, props: dict[str, float], started: float, send: Send, config: dict[str, Any]):
        self.spec, self.props, self.started, self.send = spec, props, started, send
        self.config = json.dumps(config)  # sent once, with the first row: what the trial's MLflow params say
        self.best: dict[str, float] = {}
        self.last_epoch, self.busy = 0, 0.0

    def _update_best(self, metrics: dict[str, float]) -> None:
        for o in self.spec.objective_list:
            if o.metric in metrics:
                old, value = self.best.get(o.metric), metrics[o.metric]
                self.best[o.metric] = (
                    value if old is None else (max(old, value) if o.mode == "max" else min(old, value))
                )

    def __call__(self, epoch: int, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        first = self.busy == 0.0
        self.busy += metrics.get(TRAIN_TIME, 0.0) + metrics.get(EVAL_TIME, 0.0)
        wall = time.time() - self.started
        self.last_epoch = epoch
        if not self.best and ckpt_dir is not None:  # after a resume: the best so far is in the checkpoint's history
            for past in read_meta(ckpt_dir).get("history", [])[:-1]:
                self._update_best({**self.props, **past})
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row.update(self.props)
        self._update_best(row)
        row.update({best_key(m): v for m, v in self.best.items()})
        row[FULL_BUDGET_KEY] = int(epoch >= self.spec.epochs)
        row.update({TRIAL_WALL: wall, TRIAL_OVERHEAD: wall - self.busy})
        if first:
            row.update({STARTUP: wall - self.busy, CONFIG_KEY: self.config})
        self.send(row, ckpt_dir)

    def diverged(self, exc: Exception) -> dict[str, Any]:
        row = {FAILED_KEY: 1, FAILURE_REASON_KEY: str(exc), EPOCH: self.last_epoch, FULL_BUDGET_KEY: 0, **self.props}
        row.update(
            {
                best_key(o.metric): self.best.get(o.metric, 0.0 if o.mode == "max" else float("inf"))
                for o in self.spec.objective_list
            }
        )
        return row


def restore_checkpoint(checkpoint, work: Path) -> bool:
    """A reported checkpoint (retry, restore, PBT exploit) into `work/last`, where `fit` resumes. A
    damaged one (a file cut short on the storage: checkpoint.damage) is never loaded: the trial's
    other kept checkpoints in the same directory are tried, newest first, and without an intact one
    the trial starts over (epochs redone, nothing lost). Returns whether one was restored."""
    candidates = [checkpoint, *_sibling_checkpoints(checkpoint)]
    for candidate in candidates:
        shutil.rmtree(work / "last", ignore_errors=True)
        try:
            candidate.to_directory(str(work / "last"))
        except Exception as exc:  # noqa: BLE001 - a storage read error is one more kind of damage
            log.warning("checkpoint %s cannot be read (%s)", candidate.path, exc)
            continue
        broken = damage(work / "last")
        if broken is None:
            if candidate is not checkpoint:
                log.warning("resuming from the earlier checkpoint %s instead", candidate.path)
            return True
        log.warning("checkpoint %s is damaged (%s); not loading it", candidate.path, broken)
    shutil.rmtree(work / "last", ignore_errors=True)
    log.warning("no intact checkpoint of this trial: it starts over")
    return False


def _sibling_checkpoints(checkpoint) -> list:
    """The trial's other checkpoints (`checkpoint_<n>` beside `checkpoint`), newest first."""
    import pyarrow.fs as pafs
    from ray import tune

    fs = getattr(checkpoint, "filesystem", None)
    parent, name = os.path.split(str(checkpoint.path).rstrip("/"))
    if fs is None or not name.startswith("checkpoint_"):
        return []
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    return [tune.Checkpoint(path=f"{parent}/{n}", filesystem=fs) for n in names if n != name]


def run_trial(
    spec: SweepSpec,
    params: dict[str, Any],
    work: Path,
    checkpoint,
    send: Send,
    started: float,
    *,
    reports_checkpoints: bool = True,
    trial_name: str = "",
) -> None:
    """One trial, on one process or one rank: config from the spec and `params` (dotted keys),
    resume from `checkpoint` (a Tune or Train checkpoint, or None), one `send(row, checkpoint_dir)`
    per epoch and, when the loss diverges, one final `send(row, None)` that says so (retrying a
    deterministic divergence would only repeat it). `reports_checkpoints` False: rows go without
    a checkpoint directory (the ranks of a data-parallel trial other than 0)."""
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    cfg = trial_config(spec, params, work)
    if checkpoint is not None and restore_checkpoint(checkpoint, work):
        log.info("trial %s resumes from %s", trial_name, checkpoint.path)
    props = student_properties(cfg, spec.needs_latency)
    reporter = EpochReporter(spec, props, started, send, trial_params(cfg, params.get(VARIANT_KEY)))
    limit_gpu_memory(spec.resources.gpu)  # a fractional share only without workers (spec validation)
    exchange = None
    if cfg.distill.teacher_share == "node" and METHODS[cfg.distill.method].uses_teacher:
        from sweeps.tune.exchange import RayExchange

        exchange = RayExchange.connect(spec.name, select_device(cfg.train.device))
    try:
        run_distillation(
            cfg,
            on_epoch_end=lambda epoch, metrics, ckpt: reporter(epoch, metrics, ckpt if reports_checkpoints else None),
            exchange=exchange,
        )
    except TrainingDiverged as exc:
        log.error("trial %s diverged: %s", trial_name, exc)
        send(reporter.diverged(exc), None)
    finally:
        release_gpu_memory()


def limit_gpu_memory(share: float) -> None:
    """A trial given a fraction of a GPU allocates at most that fraction of its memory (torch's caching
    allocator raises out-of-memory beyond it) instead of taking what a co-located trial needs."""
    if 0 < share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)


def release_gpu_memory() -> None:
    """The trial's cached GPU blocks back to the device when it ends: a reused actor keeps its process,
    and the next trial on it (or a co-located one) would otherwise find the memory taken."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def mark_process_free() -> None:
    """The trial on this process ended: the next trial on it (a reused process) counts from now."""
    global _process_free_since
    _process_free_since = time.time()
