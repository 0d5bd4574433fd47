"""The sweep's record in MLflow and in Tune's results: every tag, param prefix, metric name and
filter that the writer (writer.py) and the readers (reader.py, results/best_student.py, the
report, sync) share. Nothing else spells these names.

    parent run:  tags clockdistill.role=sweep, sweep_id; params spec.<key>, space.<key>;
                 artifacts spec.json, summary.json; metric teacher_AP (metrics.TEACHER_AP)
    trial runs:  tags clockdistill.role=trial, sweep_id, trial_id, mlflow.parentRunId,
                 completed_full_budget, epochs_run, best_<objective>, failure_reason,
                 best_checkpoint (+ best_checkpoint_sha256); params = the trial's flattened config;
                 metrics per epoch (step = epoch) from METRIC_ALLOW, best_<objective> so far;
                 artifacts best_checkpoint/
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from clockdistill import metrics as M

# -- tags ------------------------------------------------------------------------------------------
ROLE_TAG = "clockdistill.role"
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"
ROLE_CONFIRMATION = "confirmation"  # the parent run of a sweep's confirmation stage (best-student --confirm)
CONFIRMS_TAG = "confirms"  # on a confirmation's parent run and its trial runs: the sweep they confirm
SWEEP_ID_TAG = "sweep_id"
TRIAL_ID_TAG = "trial_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
FULL_BUDGET_TAG = "completed_full_budget"  # "true" once a trial ran every epoch of the budget
EPOCHS_RUN_TAG = "epochs_run"
FAILURE_REASON_TAG = "failure_reason"
BEST_CHECKPOINT_TAG = "best_checkpoint"  # where the trial's best checkpoint lives in the sweep storage
BEST_CHECKPOINT_SHA_TAG = "best_checkpoint_sha256"  # its weights' digest when the sweep ended
ORPHANED_TAG = "orphaned"
BASELINE_TAG = "baseline"  # "true" on the run of a sweep's no-distillation trial (spec baseline_trial)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

# -- params and artifacts -------------------------------------------------------------------------
SPEC_PARAM_PREFIX = "spec."  # parent run: the flattened spec
SPACE_PARAM_PREFIX = "space."  # parent run: each searched key and its domain
SPEC_ARTIFACT = "spec.json"
SUMMARY_ARTIFACT = "summary.json"
CHECKPOINT_ARTIFACT = "best_checkpoint"

# -- objectives and result keys (the metric names themselves: clockdistill/metrics.py) -------------
OBJECTIVE_METRICS: dict[str, str] = {
    **{m: "max" for m in M.EVALUATED_METRICS},
    **{m: "min" for m in M.STUDENT_PROPERTIES},
}  # metric -> natural mode
DEFAULT_OBJECTIVE = ("AP", "max")  # a spec without objective(s)
FAILED_KEY = "diverged"  # in a trial's final result when its loss became NaN/inf
FAILURE_REASON_KEY = "failure_reason"
FULL_BUDGET_KEY = "completed_full_budget"  # in every result row: 1 once the trial reached the budget
BASELINE_KEY = "baseline"  # in the config of a sweep's no-distillation trial (no dot: not a config override)
BASELINE_METHOD = "none"  # its distill.method
VARIANT_KEY = "variant"  # a searched name of the spec's `variants` (a bundle of config keys; no dot either)
CONFIG_KEY = "trial_config"  # in a trial's first result: its full config, flattened, as JSON (its run's params)

# Per-epoch metrics written to MLflow: every name a run emits (metrics.py), each loss term (loss_*,
# kd_*) and best_<objective>; everything else a trial reports stays in Tune's results.
_LOGGED = (*M.EVALUATED_METRICS, M.EPOCH, M.LR, M.TEACHER_AP, M.TEACHER_SHARED, *M.STUDENT_PROPERTIES, *M.TIMINGS)
METRIC_ALLOW = re.compile(r"^(" + "|".join(map(re.escape, _LOGGED)) + r"|loss.*|kd_.*|best_.*)$")


def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched knobs (its Tune config's dotted keys and variant): its run's first params."""
    return {k: v for k, v in config.items() if "." in k or k == VARIANT_KEY}


def best_key(metric: str) -> str:
    """The result key and MLflow metric of the best value of `metric` over a trial's life so far."""
    return f"best_{metric}"


def natural_mode(metric: str) -> str:
    """max for the COCO metrics, min for the student's size and latency."""
    return OBJECTIVE_METRICS.get(metric, "min")


def checkpoint_score(metric: str, mode: str) -> tuple[str, str]:
    """What a trial's checkpoints are ranked by: the primary objective when it changes with
    training (a COCO or KITTI metric), else AP (a student's size or latency is the same every epoch)."""
    return (metric, mode) if metric in M.EVALUATED_METRICS else ("AP", "max")


def metrics_to_log(result: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if METRIC_ALLOW.match(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# -- where the store is, and how runs are found ---------------------------------------------------


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the current (project) directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def quote(value: str) -> str:
    return value.replace("'", "\\'")


def role_filter(role: str) -> str:
    """MLflow search filter of every run of one role (ROLE_SWEEP or ROLE_TRIAL), whatever its sweep."""
    return f"tags.`{ROLE_TAG}` = '{role}'"


def sweep_filter(sweep_id: str | None = None, role: str = ROLE_SWEEP) -> str:
    """MLflow search filter of a sweep's parent run (every sweep's when `sweep_id` is None); with role
    ROLE_CONFIRMATION, of a confirmation stage's."""
    where = role_filter(role)
    return where + (f" and tags.{SWEEP_ID_TAG} = '{quote(sweep_id)}'" if sweep_id else "")


def trial_filter(sweep_id: str, trial_id: str | None = None) -> str:
    """MLflow search filter of a sweep's trial runs (one trial's when `trial_id` is given)."""
    where = f"tags.{SWEEP_ID_TAG} = '{quote(sweep_id)}' and tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
    return where + (f" and tags.{TRIAL_ID_TAG} = '{quote(trial_id)}'" if trial_id else "")


def ran_full_budget(tags: dict[str, str]) -> bool:
    return tags.get(FULL_BUDGET_TAG) == "true"


def finished_full_budget(run) -> bool:
    """A trial run closed after its full budget: an export candidate, left alone by a restored sweep."""
    return run.info.status == "FINISHED" and ran_full_budget(run.data.tags)


# -- how a trial is named in MLflow and on the console ---------------------------------------------

KNOB_SHORT = {
    "distill.memory.alpha": "alpha",
    "distill.memory.beta": "beta",
    "distill.logit.temperature": "T",
    "distill.logit.weight": "w",
    "distill.logit.label_noise": "noise",
    "distill.method": "method",
    "train.lr": "lr",
}  # any other key is named by its last part


def trial_number(tag: str | None, trial_id: str = "") -> int | None:
    """A trial's number in its sweep (1, 2, ...) from Tune's experiment tag (`3_distill...`) or its
    directory name (`train_trial_8870a1b2_3_distill..._2026-...`). Tune counts from 1 under a
    searcher and from 0 under its variant generator (grid, PBT), whose trial ids end in `_00002`."""
    match = re.match(r"(\d+)(?:_|$)", tag or "") or re.search(r"train_trial_[0-9a-f_]+?_(\d+)(?:_|$)", tag or "")
    if not match:
        return None
    return int(match.group(1)) + int(bool(re.search(r"_\d{5}$", trial_id)))


def _knob_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e4:
        return str(int(value))
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"  # 5.0e-3, not 5.0e-03


def trial_label(number: int | None, trial_id: str, config: dict[str, Any]) -> str:
    """`t03 alpha=5.0e-3 T=2 w=0.39`: the trial's number and its searched knobs (the dotted keys of
    its config); `t01 no-KD baseline` for the sweep's no-distillation trial."""
    head = f"t{number:02d}" if number is not None else trial_id
    if config.get(BASELINE_KEY):
        return f"{head} no-KD baseline"
    knobs = " ".join(
        f"{KNOB_SHORT.get(k, k.rsplit('.', 1)[-1])}={_knob_value(v)}"
        for k, v in config.items()
        if "." in k or k == VARIANT_KEY
    )
    return f"{head} {knobs}".strip()
