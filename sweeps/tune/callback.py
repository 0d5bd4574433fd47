"""The sweep driver's Tune callback: every trial's start, epochs and end to MLflow (buffered while
the store is down) and to the console."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from ray.tune import Callback

from sweeps.tracking import schema as S
from sweeps.tracking.schema import FAILED_KEY, best_key, metrics_to_log
from sweeps.tracking.writer import SweepTracker
from sweeps.tune.console import Console
from sweeps.tune.spec import SweepSpec, spec_from_json, spec_to_json

log = logging.getLogger("clockdistill.sweep")


class MlflowSweepCallback(Callback):
    """Forwards trial starts, epochs and ends to MLflow, and each to the console in one line. A
    trial's run is created at its start with its searched knobs as params; the trial's full config,
    built once by the trial itself, arrives with its first report (schema.CONFIG_KEY) and becomes
    the rest of its params.

    MLflow trouble never takes the sweep down: a write that fails is buffered, in order, and
    retried (at most every RETRY_S while the store is down, and at the end of the sweep), so a
    tracking server that restarts mid-sweep loses nothing. The buffer is plain data and is kept
    in Tune's experiment state with this callback."""

    RETRY_S = 5.0

    def __init__(self, spec: SweepSpec, tracker: SweepTracker):
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
                S.searched_params(trial.config),
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
                elif kind == "params":
                    self.tracker.log_params(run_id, payload[0])
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
        if S.CONFIG_KEY in result:
            self._write(trial, "params", json.loads(result[S.CONFIG_KEY]))
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
                "mlflow: %d write(s) could not be made within %.0f s; Tune's results in the sweep storage keep them",
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


def _error_line(trial) -> str:
    """The last line of a trial's error (its exception), or `error`."""
    try:
        error = trial.get_error()
        return str(error).strip().splitlines()[-1] if error else "error"
    except Exception:  # noqa: BLE001
        return "error"
