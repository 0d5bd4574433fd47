"""The sweep driver: spec -> Ray Tune (resuming a sweep of the same name) -> MLflow -> a summary.

    clockdistill sweep sweeps/configs/demo.yaml [--name NAME]
    python -m sweeps sweeps/configs/demo.yaml
    ray job submit --working-dir . -- clockdistill sweep sweeps/configs/demo.yaml

Runs on the cluster in RAY_ADDRESS when set (as under `ray job submit`), else on a local Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from clockdistill.data.index import file_digest
from sweeps.tracking import schema as S
from sweeps.tracking.schema import FAILED_KEY, best_key, checkpoint_score, default_tracking_uri
from sweeps.tracking.writer import SweepTracker
from sweeps.tune.callback import MlflowSweepCallback
from sweeps.tune.console import quiet_ray, short_path
from sweeps.tune.preflight import check_storage
from sweeps.tune.ray_connect import DRIVER_RESOURCE
from sweeps.tune.ray_connect import connect as connect_ray
from sweeps.tune.search import build_scheduler, build_searcher, tune_param_space
from sweeps.tune.spec import (
    SweepSpec,
    load_spec,
    resolve_paths,
    search_space_summary,
    spec_to_dict,
    spec_to_json,
    sweep_dir_name,
)

log = logging.getLogger("clockdistill.sweep")


def _teacher_ap(spec: SweepSpec) -> float | None:
    from clockdistill.checkpoint_meta import read_meta

    ap = read_meta(spec.teacher).get("best_ap")
    return float(ap) if ap is not None and ap >= 0 else None


def run_sweep(spec_path: str | Path, name: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Validate, start or resume the sweep, track it in MLflow; returns the summary. `verbose`: Ray's
    status tables, warnings and the trials' own output too (else one line per trial event)."""
    source = str(spec_path)
    spec = resolve_paths(load_spec(spec_path, name), source)  # every spec error before Ray starts
    return run_spec(spec, verbose)


def run_spec(spec: SweepSpec, verbose: bool = False) -> dict[str, Any]:
    """run_sweep for a validated spec with resolved paths (also a sweep's confirmation stage)."""
    storage = spec.storage_path
    tracking_uri = spec.mlflow.tracking_uri or default_tracking_uri()
    # a tracking server that is down costs seconds per attempt, not minutes of urllib3 retries:
    # the callback buffers what fails and tries again later
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not spec.mlflow.tracking_uri and "runtime_resources" in str(Path.cwd()):
        log.warning(
            "mlflow: the default store %s is inside this Ray job's temporary working directory and goes away with it; "
            "set mlflow.tracking_uri in the spec (a server, or an absolute sqlite path)",
            tracking_uri,
        )

    from ray import tune

    if not verbose:
        quiet_ray()
    where = connect_ray(
        logging_level=logging.WARNING if verbose else logging.ERROR, configure_logging=True, log_to_driver=verbose
    )
    log.info(
        "sweep %s on %s; storage %s; mlflow %s",
        spec.name,
        where,
        short_path(storage),
        tracking_uri.replace(str(Path.cwd()) + "/", ""),
    )
    check_storage(storage)  # every node writes and reads it, before any trial or MLflow run exists
    from sweeps.tune.prebuild import needs_node_caches, prebuild_node_caches

    if needs_node_caches(spec):  # decoded images and teacher outputs once per node, not in the first trials
        prebuild_node_caches(spec)
    hub = _teacher_exchange(spec)  # held: the hub lives as long as this driver holds it
    tracker = SweepTracker(tracking_uri, spec.mlflow.experiment, spec.name, spec.confirms)
    tracker.start_parent(spec_to_dict(spec), search_space_summary(spec), _teacher_ap(spec))

    from sweeps.tune.ddp import train_run_janitor
    from sweeps.tune.trainable import train_trial

    score_metric, score_mode = checkpoint_score(spec.primary.metric, spec.primary.mode)
    if (
        spec.resources.workers > 1
    ):  # the trial only drives a Train run (which asks for its workers): a sliver of a driver node
        trial_resources = tune.PlacementGroupFactory([{"CPU": 0, DRIVER_RESOURCE: 0.01}])
    else:
        trial_resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec_json=spec_to_json(spec)), trial_resources)
    if "://" not in storage:  # snapshot the experiment state often: a killed driver loses less
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
    exp_dir = sweep_dir_name(spec.name)
    exp_path = storage.rstrip("/") + "/" + exp_dir
    status, summary = "FAILED", None
    try:
        if tune.Tuner.can_restore(exp_path):
            log.info("resuming sweep %s from %s (finished trials are not rerun)", spec.name, short_path(exp_path))
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_param_space(spec),
                tune_config=tune.TuneConfig(
                    search_alg=build_searcher(spec),
                    scheduler=build_scheduler(spec),
                    num_samples=spec.num_samples + int(spec.baseline_trial),
                    max_concurrent_trials=spec.max_concurrent_trials,
                    # a data-parallel trial's actor only drives a Train run: nothing to save by reusing it, and
                    # Tune cannot reset one whose run is still winding down
                    reuse_actors=spec.reuse_actors and spec.resources.workers == 1,
                ),
                run_config=tune.RunConfig(
                    name=exp_dir,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=1, checkpoint_score_attribute=score_metric, checkpoint_score_order=score_mode
                    ),
                    callbacks=[
                        MlflowSweepCallback(spec, tracker),
                        *([train_run_janitor()] if spec.resources.workers > 1 else []),
                    ],
                    verbose=1 if verbose else 0,  # Ray's status tables; the callback prints a line per event
                ),
            )
        results = tuner.fit()
        _log_exchange(hub)
        summary = finalize(spec, tracker, results)
        status = "FINISHED"
        return summary
    finally:
        try:
            tracker.end_parent(status, summary)
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: could not close the sweep run: %s", exc)


def _teacher_exchange(spec: SweepSpec):
    """The sweep's teacher exchange (distill.teacher_share: node; sweeps/tune/exchange.py), or None."""
    import tempfile

    from sweeps.tune.trial import trial_config

    cfg = trial_config(spec, {}, Path(tempfile.gettempdir()) / "clockdistill-exchange")
    if cfg.distill.teacher_share != "node":
        return None
    from sweeps.tune.exchange import start_hub

    log.info("teacher exchange: trials on one node that train on the same batch run the teacher once")
    return start_hub(spec.name)


def _log_exchange(hub) -> None:
    """What the teacher exchange saved: the teacher outputs computed, and those a trial took from a peer."""
    if hub is None:
        return
    import ray

    try:
        n = ray.get(hub.stats.remote(), timeout=30)
    except Exception as exc:  # noqa: BLE001 (a figure for the log: never the sweep's outcome)
        log.warning("teacher exchange: no figures (%s)", exc)
        return
    log.info(
        "teacher exchange: %d teacher outputs computed, %d taken from a peer (%.0f%% of the trials' asks), "
        "%d computed again after a peer never published",
        n["computed"],
        n["taken"],
        100 * n["taken"] / max(n["computed"] + n["taken"], 1),
        n["timed_out"],
    )


def finalize(spec: SweepSpec, tracker: SweepTracker, results) -> dict[str, Any]:
    """After the sweep: each trial's best checkpoint to its MLflow run, a summary table."""
    metric, mode = spec.primary.metric, spec.primary.mode
    score_metric, score_mode = checkpoint_score(metric, mode)
    rows = []
    for result in results:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or _trial_id_from_path(result.path)
        row = {
            "trial_id": trial_id,
            "epochs": int(m.get("epoch", 0)),
            "full_budget": bool(m.get(S.FULL_BUDGET_KEY)) and not m.get(FAILED_KEY),
            best_key(metric): m.get(best_key(metric)),
            "error": str(result.error).splitlines()[-1] if result.error else (m.get(S.FAILURE_REASON_KEY) or ""),
            "config": {k: v for k, v in (result.config or {}).items() if k != S.BASELINE_KEY},
            "label": S.trial_label(S.trial_number(Path(result.path).name, trial_id), trial_id, result.config or {}),
            "baseline": bool((result.config or {}).get(S.BASELINE_KEY)),
        }
        try:
            best = result.get_best_checkpoint(score_metric, score_mode) if result.best_checkpoints else None
        except Exception:  # noqa: BLE001 - no checkpoint with the metric
            best = None
        if best is None:
            best = _train_run_checkpoint(spec, result, score_metric, score_mode)
        if best is not None:
            row["best_checkpoint"] = best.path
            try:
                run = tracker.find_trial_run(trial_id)
                if run is not None and run.data.tags.get(S.BEST_CHECKPOINT_TAG) != best.path:
                    with best.as_directory() as d:
                        tracker.log_checkpoint(
                            run.info.run_id, d, best.path, file_digest(Path(d) / "model.safetensors")
                        )
            except Exception as exc:  # noqa: BLE001
                log.warning("mlflow: could not log the best checkpoint of trial %s: %s", trial_id, exc)
        rows.append(row)
    try:
        retired = tracker.retire_orphans({r["trial_id"] for r in rows})
        if retired:
            log.info(
                "mlflow: deleted the runs of %d trial(s) the restored sweep replaced: %s",
                len(retired),
                ", ".join(retired),
            )
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: could not clean up replaced trial runs: %s", exc)
    ranked = sorted(
        (r for r in rows if r[best_key(metric)] is not None and r["full_budget"] and not r["baseline"]),
        key=lambda r: r[best_key(metric)],
        reverse=mode == "max",
    )
    baseline = next((r for r in rows if r["baseline"]), None)
    summary = {
        "sweep": spec.name,
        "objective": f"{metric} ({mode})",
        "trials": rows,
        "best": ranked[0] if ranked else None,  # the best distilled student; the baseline is not a candidate
        "baseline": baseline,
    }
    print(f"\nsweep {spec.name}: {len(rows)} trials, {sum(r['full_budget'] for r in rows)} ran the full budget")
    print(f"{'trial':<6} {'epochs':>6} {'best ' + metric:>10}  knobs")
    for r in sorted(rows, key=lambda r: r["label"]):
        value = r[best_key(metric)]
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"
        number, _, knobs = r["label"].partition(" ")
        print(f"{number:<6} {r['epochs']:>6} {shown:>10}  {knobs}{'  [' + r['error'] + ']' if r['error'] else ''}")
    if ranked:
        best_label = ranked[0]["label"].split(" ")[0]
        print(f"best: {best_label} (trial {ranked[0]['trial_id']}) with {metric} {ranked[0][best_key(metric)]:.4f}")
    return json.loads(json.dumps(summary, default=str))


def _train_run_checkpoint(spec: SweepSpec, result, metric: str, mode: str):
    """The best still-kept checkpoint of a data-parallel trial: its Train run reports checkpoints to
    Tune only as `checkpoint_path` rows (sweeps/tune/ddp.py), and keeps the best two by the objective."""
    import pyarrow.fs as pafs
    from ray import tune

    from clockdistill.checkpoint import storage_filesystem

    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or metric not in df:
        return None
    fs, _ = storage_filesystem(spec.storage_path)
    for path in df.dropna(subset=["checkpoint_path", metric]).sort_values(metric, ascending=mode == "min")[
        "checkpoint_path"
    ]:
        if fs.get_file_info(str(path)).type == pafs.FileType.Directory:
            return tune.Checkpoint(str(path), filesystem=fs)
    return None


def _trial_id_from_path(path: str | None) -> str:
    """Tune names trial directories <trainable>_<trial id>_<index>_<params>_<date>."""
    import re

    match = re.search(r"train_trial_([0-9a-f]{5,})_", Path(path).name) if path else None
    return match.group(1) if match else "?"
