"""Trials larger than one device: the Tune trial drives a data-parallel Ray Train run.

With `resources: {workers: N, cpu: C, gpu: G}` (N > 1) a trial is a light Tune function that starts
a `TorchTrainer` of N workers (C CPUs and G GPUs each; gloo on CPU, NCCL on GPU). Every worker
builds the same teacher (replicated, frozen) and student; `fit` wraps the student's side of the step
in DistributedDataParallel and gives each rank its share of every global batch of
`train.batch_size` (clockdistill/data/sampler.py: ShardedBatchSampler; loss normalisers are global, so a
step on N workers equals a step on one with the same global batch). Rank 0 evaluates, checkpoints
and reports; Ray Train's TuneReportCallback passes its rows (and the checkpoint's path as
`checkpoint_path`) up to Tune, where ASHA can stop the trial, which ends the Train run and frees
its workers. The Train run is named after the trial id, so a retried trial resumes from the run's
latest checkpoint. Population based training needs Tune checkpoints and is refused for such sweeps.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from sweeps.tracking.schema import checkpoint_score
from sweeps.tune.spec import SweepSpec, spec_from_json, spec_to_json
from sweeps.tune.trial import run_trial

log = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"  # what Ray's TuneReportCallback calls the reported checkpoint's path
TRAIN_PLACEMENT_GROUP_KEY = "train_placement_group"  # rank 0 reports its Train run's placement group id


def train_run_storage(spec) -> str:
    """Where the Train runs of a sweep keep their checkpoints: beside Tune's trial directories."""
    root = spec.storage_path.rstrip("/")
    return f"{root}/{spec.name}-train"


def train_trial_ddp(config: dict[str, Any], spec: SweepSpec, started: float) -> None:
    from ray import tune
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = spec.resources
    trial_id = tune.get_context().get_trial_id()
    per_worker = {"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}
    metric, mode = checkpoint_score(spec.primary.metric, spec.primary.mode)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "spec_json": spec_to_json(spec), "trial_id": trial_id, "started": started},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpu > 0, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.gpu else "gloo"),
        run_config=RunConfig(
            name=f"train-trial_id={trial_id}",
            storage_path=train_run_storage(spec),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
        ),
    )
    log.info("trial %s: data-parallel run on %d workers (%s each)", trial_id, r.workers, per_worker)
    trainer.fit()


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One rank of a data-parallel trial (runs inside a Ray Train worker): the trial loop, with
    every rank taking part in each report and only rank 0's row and checkpoint reaching Tune."""
    import ray.train
    from ray.util import get_current_placement_group

    spec = spec_from_json(loop_config["spec_json"])
    rank = ray.train.get_context().get_world_rank()
    # node-local working directory per rank (ranks of one trial may share a node)
    work = Path(tempfile.gettempdir()) / "clockdistill-ddp" / loop_config["trial_id"] / f"rank{rank}"

    group = get_current_placement_group()  # the Train run's: the sweep driver removes it if Ray does not

    def send(row: dict, ckpt: Path | None) -> None:
        if group is not None:
            row = {**row, TRAIN_PLACEMENT_GROUP_KEY: group.id.hex()}
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)

    # every rank resumes a retried trial from the run's latest checkpoint
    run_trial(
        spec,
        loop_config["config"],
        work,
        ray.train.get_checkpoint(),
        send,
        loop_config["started"],
        reports_checkpoints=rank == 0,
        trial_name=f"{loop_config['trial_id']} rank {rank}",
    )


def train_run_janitor():
    """A Tune callback for the sweep driver: when a data-parallel trial ends (finished, stopped by the
    scheduler, or failed before a retry), the placement group of its Train run is removed if it is
    still there. Ray 2.60 removes it when the Train run ends on its own, but a trial that Tune stops
    mid-run (ASHA, or its last epoch reported) loses its Train controller before that cleanup now and
    then; the group then stays reserved until the sweep's job ends and starves every later trial."""
    from ray.tune import Callback

    class TrainRunJanitor(Callback):
        def _remove(self, trial) -> None:
            group = (trial.last_result or {}).get(TRAIN_PLACEMENT_GROUP_KEY)
            if not group:
                return
            try:
                from ray._raylet import PlacementGroupID
                from ray.util import placement_group_table, remove_placement_group
                from ray.util.placement_group import PlacementGroup

                state = placement_group_table().get(group, {}).get("state")
                if state in ("PENDING", "CREATED", "RESCHEDULING"):
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))
                    log.warning(
                        "trial %s: its Train run left placement group %s reserved; removed", trial.trial_id, group
                    )
            except Exception as exc:  # noqa: BLE001 - bookkeeping must never end the sweep
                log.warning("trial %s: could not check its Train run's placement group: %s", trial.trial_id, exc)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._remove(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._remove(trial)

    return TrainRunJanitor()
