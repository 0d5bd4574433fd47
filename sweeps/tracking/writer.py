"""Writing a sweep to MLflow: one parent run per sweep, one child run per trial, by the driver only.

Only the driver talks to MLflow (trials report to Tune; a Tune callback forwards to MLflow), so a
SQLite store never sees concurrent writers. Runs are found again by tags, never duplicated; every
name written here is defined in schema.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from clockdistill import metrics as M
from clockdistill.config.dotted import flatten_dict
from sweeps.tracking import schema as S

log = logging.getLogger(__name__)

PARAM_BATCH = 100  # MLflow's per-call limit on params


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ray_job_id() -> str:
    """The `ray job submit` submission id when running as a job, else the Ray driver's job id."""
    meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}").get("metadata", {})
    if meta.get("job_submission_id"):
        return str(meta["job_submission_id"])
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else "none"
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a local store go next to its database, by absolute path: MLflow's default,
    ./mlruns of the creating process, would land in a Ray job's temporary working directory.
    A tracking server decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).resolve().as_uri()
    return None


class SweepTracker:
    """MLflow bookkeeping of one sweep. Picklable (Tune stores its callbacks with the experiment)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str, confirms: str = ""):
        """`confirms`: this is the confirmation stage of that sweep (best-student --confirm): its parent run
        is nested under the sweep's, and it and its trial runs carry the CONFIRMS tag."""
        self.tracking_uri, self.experiment, self.sweep_id = tracking_uri, experiment, sweep_id
        self.confirms = confirms
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id
        self._logged_epoch: dict[str, int] = {}  # run_id -> last epoch written
        self.parent_run_id: str | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.tracking_uri, self.experiment)
                )
            )
            if exp is None or S.EXPERIMENT_KIND_TAG not in exp.tags:  # the UI opens it on its training-runs view
                self.client.set_experiment_tag(self._experiment_id, S.EXPERIMENT_KIND_TAG, "custom_model_development")
        return self._experiment_id

    def _find(self, filter_string: str):
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=2, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    # -- the sweep's parent run ------------------------------------------------------------------

    def find_parent(self):
        return self._find(S.sweep_filter(self.sweep_id, S.ROLE_CONFIRMATION if self.confirms else S.ROLE_SWEEP))

    def _confirmation_tags(self) -> dict[str, str]:
        if not self.confirms:
            return {}
        confirmed = self._find(S.sweep_filter(self.confirms))
        nest = {S.PARENT_RUN_TAG: confirmed.info.run_id} if confirmed is not None else {}
        return {S.CONFIRMS_TAG: self.confirms, **nest}

    def start_parent(self, spec_dict: dict[str, Any], space: dict[str, str], teacher_ap: float | None) -> str:
        """Create the sweep's run, or reopen it when the sweep resumes."""
        run = self.find_parent()
        tags = {"git_sha": git_sha(), "ray_job_id": ray_job_id()}
        if run is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.sweep_id,
                tags={
                    S.SWEEP_ID_TAG: self.sweep_id,
                    S.ROLE_TAG: S.ROLE_CONFIRMATION if self.confirms else S.ROLE_SWEEP,
                    **self._confirmation_tags(),
                    **tags,
                },
            )
            params = {f"{S.SPEC_PARAM_PREFIX}{k}": v for k, v in flatten_dict(spec_dict).items() if k != "search_space"}
            params.update({f"{S.SPACE_PARAM_PREFIX}{k}": v for k, v in space.items()})
            self._log_new_params(run.info.run_id, params, {})
            self.client.log_dict(run.info.run_id, spec_dict, S.SPEC_ARTIFACT)
            if teacher_ap is not None:
                self.client.log_metric(run.info.run_id, M.TEACHER_AP, teacher_ap)
            log.info("mlflow: sweep run %s created in experiment %s", run.info.run_id, self.experiment)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run.info.run_id, f"resumed_{k}" if k == "ray_job_id" else k, v)
            log.info("mlflow: sweep run %s found again (resuming)", run.info.run_id)
        self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def end_parent(self, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
        if self.parent_run_id is None:
            return
        if summary:
            self.client.log_dict(self.parent_run_id, summary, S.SUMMARY_ARTIFACT)
        self.client.set_terminated(self.parent_run_id, status=status)

    # -- trial runs ------------------------------------------------------------------------------

    def find_trial_run(self, trial_id: str):
        return self._find(S.trial_filter(self.sweep_id, trial_id))

    def trial_run(self, trial_id: str, trial_name: str, params: dict[str, Any], baseline: bool = False) -> str:
        """The child run of a running trial: found by trial_id (and marked running again), created
        (named `trial_name`, with its params) when new; `baseline` tags the no-distillation trial."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        run = self.find_trial_run(trial_id)
        if run is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=trial_name,
                tags={
                    S.PARENT_RUN_TAG: self.parent_run_id or "",
                    S.SWEEP_ID_TAG: self.sweep_id,
                    S.TRIAL_ID_TAG: trial_id,
                    S.ROLE_TAG: S.ROLE_TRIAL,
                    S.FULL_BUDGET_TAG: "false",
                    **({S.BASELINE_TAG: "true"} if baseline else {}),
                    **({S.CONFIRMS_TAG: self.confirms} if self.confirms else {}),
                },
            )
            self._log_new_params(run.info.run_id, params, {})
        else:
            self._logged_epoch[run.info.run_id] = int(run.data.metrics.get("epoch", 0))
            if run.info.status != "RUNNING" and not self.is_done(run):
                self.client.update_run(run.info.run_id, status="RUNNING")
        self._runs[trial_id] = run.info.run_id
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params the run does not have yet (MLflow params are write-once: a searched knob logged when the
        run opened keeps the value Tune gave it)."""
        self._log_new_params(run_id, params, self.client.get_run(run_id).data.params)

    def _log_new_params(self, run_id: str, params: dict[str, Any], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + PARAM_BATCH])

    def log_epoch(self, run_id: str, result: dict[str, Any]) -> bool:
        """Write one epoch's allow-listed metrics in one batch; an epoch already written (a trial
        that resumed from an older checkpoint) is skipped. Returns whether anything was written."""
        from mlflow.entities import Metric

        epoch = int(result.get("epoch", 0))
        if epoch <= self._logged_epoch.get(run_id, 0):
            return False
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in S.metrics_to_log(result).items()]
        self.client.log_batch(run_id, metrics=metrics)
        self._logged_epoch[run_id] = epoch
        return True

    @staticmethod
    def is_done(run) -> bool:
        """A run closed after its full budget: a restored sweep leaves it as it is."""
        return S.finished_full_budget(run)

    def end_trial(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        run = self.client.get_run(run_id)
        if self.is_done(run):  # a finished trial that a restored sweep saw complete again
            return
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=status)

    def retire_orphans(self, trial_ids: set[str]) -> list[str]:
        """Runs of trials the sweep no longer has (started just before a driver crash, then re-created
        by the restored sweep under a new id): tagged, closed as KILLED and deleted (restorable),
        so the experiment holds one run per trial."""
        retired = []
        for run in self.trial_runs():
            trial_id = run.data.tags.get(S.TRIAL_ID_TAG)
            if trial_id and trial_id not in trial_ids:
                self.client.set_tag(run.info.run_id, S.ORPHANED_TAG, "true")
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
                retired.append(trial_id)
        return retired

    def log_checkpoint(self, run_id: str, checkpoint_dir: str | Path, storage_path: str, sha256: str) -> None:
        """The weights and metadata of a trial's best checkpoint (not its optimizer state) as run
        artifacts, and where it lives in the sweep storage with its weights' digest as tags."""
        for name in ("model.safetensors", "meta.json", "extra.safetensors"):
            path = Path(checkpoint_dir) / name
            if path.is_file():
                self.client.log_artifact(run_id, str(path), S.CHECKPOINT_ARTIFACT)
        self.tag_checkpoint(run_id, storage_path, sha256)

    def tag_checkpoint(self, run_id: str, storage_path: str, sha256: str) -> None:
        # best-student refuses a checkpoint whose weights changed after this point
        self.client.set_tag(run_id, S.BEST_CHECKPOINT_SHA_TAG, sha256)
        self.client.set_tag(run_id, S.BEST_CHECKPOINT_TAG, storage_path)

    def trial_runs(self) -> list:
        """All child runs of this sweep."""
        return list(self.client.search_runs([self.experiment_id], S.trial_filter(self.sweep_id), max_results=10000))
