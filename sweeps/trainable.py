"""The trial: one `run_distillation` call with the trial's knobs, reporting to Tune once per epoch.

Each report carries every metric of the epoch (AP..., every loss term), `best_<objective>` (best so
far over the trial's life), the student's `params` (and `latency_ms` when an objective asks for it),
and the epoch's checkpoint (weights, optimizer, metadata). A retried or restored trial resumes from
its last reported checkpoint. A trial whose loss turns NaN ends with `diverged=1` and its reason
instead of raising: retrying a deterministic divergence would only repeat it.

Every report also carries the trial's own clock: `trial_wall_s` since the trial's process started
(or, in a reused process, since it finished its previous trial), `trial_overhead_s` = the part of
it not spent in training or evaluation epochs, and on the first report `startup_s` (imports, model
and data set-up, cache opening, the first checkpoint) - the waste the sweep wants small.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from clockdistill.config import Config
from sweeps.search import FAILED_KEY, best_key
from sweeps.spec import SweepSpec, base_config_dict, spec_from_json, with_dotted

log = logging.getLogger(__name__)

_process_free_since: float | None = None  # when this (reused) process finished its previous trial


def _trial_clock_start() -> float:
    """When this trial's time started: its process's start, or the end of the process's last trial."""
    if _process_free_since is not None:
        return _process_free_since
    try:  # Linux: the process's start in clock ticks after boot (field 22 of /proc/self/stat)
        import os

        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # no /proc: count from now
        return time.time()


def trial_config(spec: SweepSpec, params: dict[str, Any], output_dir: str | Path) -> Config:
    """The full config of a trial: spec base + the trial's dotted params + the sweep's fixed keys."""
    from clockdistill.distill import distill_config

    raw = base_config_dict(spec)
    for key, value in params.items():
        raw = with_dotted(raw, key, value)
    for key, value in (("train.output_dir", str(output_dir)), ("train.resume", True), ("train.eval_every", 1),
                       ("train.progress", False)):
        raw = with_dotted(raw, key, value)
    return distill_config(data=raw, teacher=spec.teacher)


def _student_properties(cfg: Config, need_latency: bool) -> dict[str, float]:
    from clockdistill.engine import forward_latency_ms, select_device
    from clockdistill.models import build_detector

    model = build_detector(cfg.model, cfg.model.num_classes)
    props = {"params": float(sum(p.numel() for p in model.parameters()))}
    if need_latency:
        props["latency_ms"] = forward_latency_ms(model, cfg.data.max_size, select_device(cfg.train.device))
    return props


class EpochReporter:
    """Turns `fit`'s epoch callback into the trial's report rows: every numeric metric, the
    student's properties, best_<objective> so far, completed_full_budget and the trial clock.
    `send(row, checkpoint_dir or None)` delivers a row (to Tune, or to Ray Train's report)."""

    def __init__(self, spec: SweepSpec, props: dict[str, float], started: float, send: Callable[[dict, Path | None], None]):
        self.spec, self.props, self.started, self.send = spec, props, started, send
        self.best: dict[str, float] = {}
        self.last_epoch, self.busy = 0, 0.0

    def _update_best(self, metrics: dict[str, float]) -> None:
        for o in self.spec.objective_list:
            if o.metric in metrics:
                old, value = self.best.get(o.metric), metrics[o.metric]
                self.best[o.metric] = value if old is None else (max(old, value) if o.mode == "max" else min(old, value))

    def __call__(self, epoch: int, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        first = self.busy == 0.0
        self.busy += metrics.get("train_time_s", 0.0) + metrics.get("eval_time_s", 0.0)
        wall = time.time() - self.started
        self.last_epoch = epoch
        if not self.best and ckpt_dir is not None:  # after a resume: the best so far is in the checkpoint's history
            from clockdistill.checkpoint import read_meta

            for past in read_meta(ckpt_dir).get("history", [])[:-1]:
                self._update_best({**self.props, **past})
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row.update(self.props)
        self._update_best(row)
        row.update({best_key(m): v for m, v in self.best.items()})
        row["completed_full_budget"] = int(epoch >= self.spec.epochs)
        row.update(trial_wall_s=wall, trial_overhead_s=wall - self.busy)
        if first:
            row["startup_s"] = wall - self.busy
        self.send(row, ckpt_dir)

    def diverged(self, exc: Exception) -> dict[str, Any]:
        row = {FAILED_KEY: 1, "failure_reason": str(exc), "epoch": self.last_epoch, "completed_full_budget": 0, **self.props}
        row.update({best_key(o.metric): self.best.get(o.metric, 0.0 if o.mode == "max" else float("inf")) for o in self.spec.objective_list})
        return row


def _restore(checkpoint, work: Path) -> None:
    """A reported checkpoint (retry, restore, PBT exploit) into `work/last`, where `fit` resumes."""
    shutil.rmtree(work / "last", ignore_errors=True)
    checkpoint.to_directory(str(work / "last"))


def train_trial(config: dict[str, Any], spec_json: str) -> None:
    """Tune function trainable. `config` holds the trial's dotted keys; the spec travels as JSON.
    With `resources.workers` > 1 the trial drives a data-parallel Ray Train run instead."""
    global _process_free_since
    started = _trial_clock_start()
    try:
        if spec_from_json(spec_json).resources.workers > 1:
            from sweeps.ddp import train_trial_ddp

            train_trial_ddp(config, spec_json)
        else:
            _train_trial(config, spec_json, started)
    finally:
        _process_free_since = time.time()


def _train_trial(config: dict[str, Any], spec_json: str, started: float) -> None:
    from ray import tune

    from clockdistill.distill import run_distillation
    from clockdistill.engine import TrainingDiverged

    spec = spec_from_json(spec_json)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    ctx = tune.get_context()
    work = Path(ctx.get_trial_dir()) / "work"
    cfg = trial_config(spec, config, work)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        _restore(checkpoint, work)
        log.info("trial %s resumes from %s", ctx.get_trial_id(), checkpoint.path)
    props = _student_properties(cfg, any(o.metric == "latency_ms" for o in spec.objective_list))
    reporter = EpochReporter(spec, props, started, lambda row, ckpt: tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(ckpt))))
    try:
        run_distillation(cfg, on_epoch_end=reporter)
    except TrainingDiverged as exc:
        log.error("trial %s diverged: %s", ctx.get_trial_id(), exc)
        tune.report(reporter.diverged(exc))
