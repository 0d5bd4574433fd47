"""Trials larger than one device: the Tune trial drives a data-parallel Ray Train run.

With `resources: {workers: N, cpu: C, gpu: G}` (N > 1) a trial is a light Tune function that starts
a `TorchTrainer` of N workers (C CPUs and G GPUs each; gloo on CPU, NCCL on GPU). Every worker
builds the same teacher (replicated, frozen) and student; `fit` wraps the student's side of the step
in DistributedDataParallel and gives each rank its share of every global batch of
`train.batch_size` (clockdistill/engine.py: ShardedBatchSampler; loss normalisers are global, so a
step on N workers equals a step on one with the same global batch). Rank 0 evaluates, checkpoints
and reports; Ray Train's TuneReportCallback passes its rows (and the checkpoint's path as
`checkpoint_path`) up to Tune, where ASHA can stop the trial, which ends the Train run and frees
its workers. The Train run is named after the trial id, so a retried trial resumes from the run's
latest checkpoint. Population based training needs Tune checkpoints and is refused for such sweeps.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sweeps.spec import spec_from_json

log = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"  # what Ray's TuneReportCallback calls the reported checkpoint's path


def train_run_storage(spec) -> str:
    """Where the Train runs of a sweep keep their checkpoints: beside Tune's trial directories."""
    root = spec.storage_path.rstrip("/")
    return f"{root}/{spec.name}-train"


def train_trial_ddp(config: dict[str, Any], spec_json: str) -> None:
    from ray import tune
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = spec_from_json(spec_json)
    r = spec.resources
    trial_id = tune.get_context().get_trial_id()
    per_worker = {"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}
    primary = spec.primary
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "spec_json": spec_json, "trial_id": trial_id, "started": time.time()},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpu > 0, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.gpu else "gloo"),
        run_config=RunConfig(name=f"train-trial_id={trial_id}", storage_path=train_run_storage(spec), callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=primary.metric,
                                                                checkpoint_score_order=primary.mode)),
    )
    log.info("trial %s: data-parallel run on %d workers (%s each)", trial_id, r.workers, per_worker)
    trainer.fit()


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One rank of a data-parallel trial (runs inside a Ray Train worker)."""
    import ray.train

    from clockdistill.distill import run_distillation
    from clockdistill.engine import TrainingDiverged
    from sweeps.trainable import EpochReporter, _restore, _student_properties, trial_config

    spec = spec_from_json(loop_config["spec_json"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    # node-local working directory per rank (ranks of one trial may share a node)
    work = Path(tempfile.gettempdir()) / "clockdistill-ddp" / loop_config["trial_id"] / f"rank{rank}"
    cfg = trial_config(spec, loop_config["config"], work)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried trial: every rank resumes from the run's latest checkpoint
        _restore(checkpoint, work)
    props = _student_properties(cfg, any(o.metric == "latency_ms" for o in spec.objective_list))

    def send(row: dict, ckpt_dir: Path | None) -> None:
        if rank == 0:
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
        else:  # every rank takes part in each report; only rank 0's row and checkpoint reach Tune
            ray.train.report(row, checkpoint=None)

    reporter = EpochReporter(spec, props, loop_config["started"], send)
    try:
        run_distillation(cfg, on_epoch_end=lambda epoch, metrics, ckpt: reporter(epoch, metrics, ckpt if rank == 0 else None))
    except TrainingDiverged as exc:
        ray.train.report(reporter.diverged(exc))
