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
import time
from pathlib import Path
from typing import Any

from clockdistill.checkpoint import file_sha256
from sweeps import schema as S
from sweeps.mlflow_writer import SweepTracker
from sweeps.preflight import check_storage
from sweeps.ray_connect import DRIVER_RESOURCE
from sweeps.ray_connect import connect as connect_ray
from sweeps.schema import FAILED_KEY, best_key, checkpoint_score, default_tracking_uri, metrics_to_log
from sweeps.search import build_scheduler, build_searcher, tune_param_space
from sweeps.spec import (
    SweepSpec,
    load_spec,
    resolve_paths,
    search_space_summary,
    spec_from_json,
    spec_to_dict,
    spec_to_json,
    sweep_dir_name,
)

log = logging.getLogger("clockdistill.sweep")


def trial_params(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The flattened full config of a trial, as MLflow params."""
    from sweeps.trial import trial_config

    cfg = trial_config(spec, {k: v for k, v in config.items() if "." in k}, "-")
    flat = cfg.flatten()
    flat.pop("train.output_dir", None)
    return flat


class Console:
    """The sweep's console: one line per trial event (started with its knobs, an epoch's objective,
    stopped early, failed, finished) and, after each end, where the sweep stands."""

    def __init__(self, spec: SweepSpec):
        self.metric = spec.primary.metric
        self.maximize = spec.primary.mode == "max"
        self.epochs = spec.epochs
        grid = math.prod(len(d.value) for d in spec.search_space.values() if d.kind == "grid")
        self.total = spec.num_samples * grid + int(spec.baseline_trial)
        self.started = time.monotonic()
        self.ended: dict[str, str] = {}  # trial id -> finished | stopped | failed
        self.retries: dict[str, int] = {}  # trial id -> retries so far

    def __getstate__(self):  # kept with the callback in Tune's experiment state: a resumed sweep counts on
        return {**self.__dict__, "started": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)

    def trial_started(self, label: str) -> None:
        number, _, knobs = label.partition(" ")
        self.say(f"{number} started   {knobs}")

    def epoch(self, label: str, result: dict[str, Any]) -> None:
        value, best = result.get(self.metric), result.get(best_key(self.metric))
        if not isinstance(value, (int, float)):
            return
        shown = f"{self.metric} {value:.4f}" + (f" (best {best:.4f})" if isinstance(best, (int, float)) else "")
        self.say(f"{label.split(' ')[0]} epoch {int(result.get('epoch', 0))}/{self.epochs}  {shown}")

    def retrying(self, trial_id: str, label: str, attempt: int, allowed: int, reason: str) -> None:
        """A trial's process or node died and Tune runs it again from its last checkpoint."""
        self.retries[trial_id] = attempt
        self.say(
            f"{label.split(' ')[0]} retry {attempt} of {allowed} from its last checkpoint (trial {trial_id}): {reason}"
        )

    def trial_ended(self, trial_id: str, label: str, how: str, epochs: int, best: float | None, reason: str) -> None:
        number = label.split(" ")[0]
        self.ended[trial_id] = how
        best_text = f"best {self.metric} {best:.4f}" if best is not None else f"no {self.metric}"
        retried = self.retries.get(trial_id, 0)
        after = f", after {retried} retr{'y' if retried == 1 else 'ies'}" if retried else ""
        if how == "failed":
            self.say(f"{number} failed after {epochs}/{self.epochs} epoch(s){after}: {reason}")
        elif how == "stopped":
            self.say(f"{number} stopped early after {epochs}/{self.epochs} epoch(s), {best_text}{after}")
        else:
            self.say(f"{number} finished  {best_text} after {epochs}/{self.epochs} epochs{after}")

    def progress(self, ended: list[tuple[str, str, float | None, bool]], running: int) -> None:
        """ended: (number, finished | stopped | failed, best value or None, no-KD?) of every trial that
        has ended, those of a sweep before its restore included."""
        counts = {k: sum(how == k for _, how, _, _ in ended) for k in ("finished", "stopped", "failed")}
        scored = [(value, number) for number, _, value, no_kd in ended if value is not None and not no_kd]
        top = (max if self.maximize else min)(scored) if scored else None
        best = f"; best so far {top[1]} {self.metric} {top[0]:.4f}" if top else ""
        self.say(
            f"    [{len(ended)}/{self.total} trials done: {counts['finished']} finished, {counts['stopped']} "
            f"stopped early, {counts['failed']} failed; {running} running{best}; "
            f"{(time.monotonic() - self.started) / 60:.1f} min]"
        )


def make_callback(spec: SweepSpec, tracker: SweepTracker):
    from ray.tune import Callback

    class MlflowSweepCallback(Callback):
        """Forwards trial starts, epochs and ends to MLflow, and each to the console in one line.
        MLflow trouble never takes the sweep down: a write that fails is buffered, in order, and
        retried (at most every RETRY_S while the store is down, and at the end of the sweep), so a
        tracking server that restarts mid-sweep loses nothing. The buffer is plain data and is kept
        in Tune's experiment state with this callback."""

        RETRY_S = 5.0

        def __init__(self):
            self.spec_json = spec_to_json(spec)
            self.tracker = tracker
            self._spec: SweepSpec | None = None
            self._pending: list[tuple] = []  # (kind, trial_id, *payload), oldest first
            self._trials: dict[str, tuple[str, dict[str, Any], bool]] = {}  # trial_id -> (run name, params,
            # baseline?), built once
            self.console = Console(spec)
            self._down_since: float | None = None
            self._last_try = 0.0

        def __getstate__(self):
            return {
                "spec_json": self.spec_json,
                "tracker": self.tracker,
                "_spec": None,
                "_pending": list(self._pending),
                "_trials": dict(self._trials),
                "console": self.console,
                "_down_since": None,
                "_last_try": 0.0,
            }

        @property
        def spec(self) -> SweepSpec:
            if self._spec is None:
                self._spec = spec_from_json(self.spec_json)
            return self._spec

        def _write(self, trial, kind: str, *payload) -> None:
            if trial.trial_id not in self._trials:  # params go to MLflow once, when its run is created
                self._trials[trial.trial_id] = (
                    self.label(trial),
                    trial_params(self.spec, trial.config),
                    bool(trial.config.get(S.BASELINE_KEY)),
                )
            self._pending.append((kind, trial.trial_id, *payload))
            if self._down_since is None or time.monotonic() - self._last_try >= self.RETRY_S:
                self._flush()

        def _flush(self) -> bool:
            """Apply buffered writes in order; False (and the rest kept) at the first failure."""
            self._last_try = time.monotonic()
            while self._pending:
                kind, trial_id, *payload = self._pending[0]
                try:
                    run_id = self.tracker.trial_run(trial_id, *self._trials[trial_id])
                    if kind == "epoch":
                        self.tracker.log_epoch(run_id, payload[0])
                    elif kind == "end":
                        self.tracker.end_trial(run_id, *payload)
                except Exception as exc:  # noqa: BLE001 - the store is down or refusing: keep the write
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning(
                            "mlflow: %s; buffering its writes and retrying every %.0f s",
                            str(exc).splitlines()[0][:300],
                            self.RETRY_S,
                        )
                    return False
                self._pending.pop(0)
            if self._down_since is not None:
                log.warning(
                    "mlflow: reachable again after %.0f s; buffered writes are written",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            return True

        @staticmethod
        def label(trial) -> str:
            return S.trial_label(S.trial_number(trial.experiment_tag, trial.trial_id), trial.trial_id, trial.config)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.console.trial_started(self.label(trial))
            self._write(trial, "open")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if FAILED_KEY in result:
                return
            self.console.epoch(self.label(trial), result)
            self._write(trial, "epoch", {**metrics_to_log(result), "epoch": result.get("epoch", 0)})

        def on_experiment_end(self, trials, **info):
            patience = float(os.environ.get("CLOCKDISTILL_MLFLOW_PATIENCE_S", "300"))
            deadline = time.monotonic() + patience
            while not self._flush() and time.monotonic() < deadline:
                time.sleep(self.RETRY_S)
            if self._pending:
                log.error(
                    "mlflow: %d write(s) could not be made within %.0f s; Tune's results in the sweep storage keep "
                    "them",
                    len(self._pending),
                    patience,
                )

        def _end(self, trial, trials, status: str, reason: str = "") -> None:
            try:
                self._end_unguarded(trial, status, reason)
                running = sum(t.status == "RUNNING" and t is not trial for t in trials)
                self.console.progress([e for e in map(self._ended, trials, [trial] * len(trials)) if e], running)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must never end the sweep
                log.warning("could not record the end of trial %s: %s", trial.trial_id, exc)

        def _ended(self, t, current) -> tuple[str, str, float | None, bool] | None:
            """(number, how it ended, its best objective, no-KD?) of a trial that has ended, else None;
            from Tune's record, so the trials a restored sweep finished before count too."""
            result = t.last_result or {}
            if t is current:
                how = self.console.ended[t.trial_id]
            elif t.status == "ERROR" or (t.status == "TERMINATED" and result.get(FAILED_KEY)):
                how = "failed"
            elif t.status == "TERMINATED":
                how = "finished" if result.get(S.FULL_BUDGET_KEY) else "stopped"
            else:
                return None
            value = result.get(best_key(self.spec.primary.metric))
            value = value if isinstance(value, (int, float)) and math.isfinite(value) else None
            return self.label(t).split(" ")[0], how, value, bool(t.config.get(S.BASELINE_KEY))

        def _end_unguarded(self, trial, status: str, reason: str) -> None:
            result = trial.last_result or {}
            metric = self.spec.primary.metric
            full = bool(result.get(S.FULL_BUDGET_KEY)) and not result.get(FAILED_KEY)
            best = result.get(best_key(metric))
            tags = {S.FULL_BUDGET_TAG: str(full).lower(), S.EPOCHS_RUN_TAG: str(int(result.get("epoch", 0)))}
            if best is not None and math.isfinite(best):
                tags[best_key(metric)] = f"{best:.6f}"
            if result.get(FAILED_KEY):
                status, reason = "FAILED", result.get(S.FAILURE_REASON_KEY, FAILED_KEY)
            if reason:
                tags[S.FAILURE_REASON_TAG] = reason[:4000]
            how = "finished" if full else ("failed" if status == "FAILED" else "stopped")
            shown = best if best is not None and math.isfinite(best) else None
            self.console.trial_ended(trial.trial_id, self.label(trial), how, int(result.get("epoch", 0)), shown, reason)
            self._write(trial, "end", status, tags)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, trials, "FINISHED")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.console.retrying(
                trial.trial_id, self.label(trial), trial.num_failures, self.spec.max_failures, _error_line(trial)
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, trials, "FAILED", _error_line(trial))

    return MlflowSweepCallback()


def _error_line(trial) -> str:
    """The last line of a trial's error (its exception), or `error`."""
    try:
        error = trial.get_error()
        return str(error).strip().splitlines()[-1] if error else "error"
    except Exception:  # noqa: BLE001
        return "error"


def _teacher_ap(spec: SweepSpec) -> float | None:
    from clockdistill.checkpoint import read_meta

    ap = read_meta(spec.teacher).get("best_ap")
    return float(ap) if ap is not None and ap >= 0 else None


def quiet_ray() -> None:
    """Ray's own console output off (its status tables are off through RunConfig(verbose=0)):
    warnings such as the experiment-state snapshot notices, and the multi-line error reports of
    failed trials, which the sweep's console says in one line. `--verbose` keeps them."""
    # Tune's newer console reporter prints its experiment box, result paths and error files whatever
    # the verbosity; the classic one prints nothing at verbose 0
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."


def run_sweep(spec_path: str | Path, name: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Validate, start or resume the sweep, track it in MLflow; returns the summary. `verbose`: Ray's
    status tables, warnings and the trials' own output too (else one line per trial event)."""
    source = str(spec_path)
    spec = resolve_paths(load_spec(spec_path, name), source)  # every spec error before Ray starts
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
        S.short_path(storage),
        tracking_uri.replace(str(Path.cwd()) + "/", ""),
    )
    check_storage(storage)  # every node writes and reads it, before any trial or MLflow run exists
    from sweeps.prebuild import needs_node_caches, prebuild_node_caches

    if needs_node_caches(spec):  # decoded images and teacher outputs once per node, not in the first trials
        prebuild_node_caches(spec)
    tracker = SweepTracker(tracking_uri, spec.mlflow.experiment, spec.name)
    tracker.start_parent(spec_to_dict(spec), search_space_summary(spec), _teacher_ap(spec))

    from sweeps.ddp import train_run_janitor
    from sweeps.trainable import train_trial

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
            log.info("resuming sweep %s from %s (finished trials are not rerun)", spec.name, S.short_path(exp_path))
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
                        make_callback(spec, tracker),
                        *([train_run_janitor()] if spec.resources.workers > 1 else []),
                    ],
                    verbose=1 if verbose else 0,  # Ray's status tables; the callback prints a line per event
                ),
            )
        results = tuner.fit()
        summary = finalize(spec, tracker, results)
        status = "FINISHED"
        return summary
    finally:
        try:
            tracker.end_parent(status, summary)
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: could not close the sweep run: %s", exc)


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
                            run.info.run_id, d, best.path, file_sha256(Path(d) / "model.safetensors")
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
    Tune only as `checkpoint_path` rows (sweeps/ddp.py), and keeps the best two by the objective."""
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
