"""Reading a sweep back from MLflow: its parent run, its trials, their metrics and the Pareto set.

The sweep driver writes (writer.py); `best-student`, `report` and `sync` read through here.
The names both sides use are in schema.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clockdistill import metrics as M
from clockdistill.errors import UserError
from sweeps.tracking import schema as S


def open_client(tracking_uri: str | None = None):
    """An MlflowClient after checking that the store is there: a SQLite file that exists, or a
    server that answers /health within a few seconds (MLflow itself would retry for minutes)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or S.default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # checkpoints and plots: bars are noise
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise UserError(
                f"no MLflow store at {db}: run a sweep first (make demo, or make sweep SPEC=...), "
                "or point MLFLOW_TRACKING_URI at your store"
            )
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"MLflow server {uri} is unreachable ({reason}): start it (make mlflow-ui, or the cluster's "
                "tracking server) or set MLFLOW_TRACKING_URI"
            ) from None
    return MlflowClient(uri)


@dataclass
class Sweep:
    run: Any  # the parent mlflow Run
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return self.run.data.tags[S.SWEEP_ID_TAG]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.run.info.experiment_id

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """[(metric, mode)], the primary objective first."""
        metric, mode = S.DEFAULT_OBJECTIVE
        objs = self.spec.get("objectives") or [self.spec.get("objective") or {}]
        return [(o.get("metric", metric), o.get("mode", mode)) for o in objs]

    @property
    def teacher_ap(self) -> float | None:
        return self.run.data.metrics.get(M.TEACHER_AP)

    @property
    def searched_keys(self) -> list[str]:
        """The dotted config keys the sweep searched (its `space.` params)."""
        prefix = S.SPACE_PARAM_PREFIX
        return sorted(k[len(prefix) :] for k in self.run.data.params if k.startswith(prefix))

    @property
    def registered_model(self) -> str:
        ml = self.spec.get("mlflow") or {}
        return ml.get("registered_model") or f"{ml.get('experiment') or 'clockdistill'}-student"


@dataclass
class Trial:
    run: Any
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def trial_id(self) -> str:
        return self.run.data.tags.get(S.TRIAL_ID_TAG, "?")

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def status(self) -> str:
        return self.run.info.status

    @property
    def full_budget(self) -> bool:
        return S.ran_full_budget(self.run.data.tags)

    @property
    def finished(self) -> bool:
        """Ran its full budget and ended without error: an export candidate."""
        return S.finished_full_budget(self.run)

    @property
    def name(self) -> str:
        """`t02 (8870a1b2)`: the trial's number (from its run name) and id, as the sweep's console said."""
        number = (self.run.info.run_name or "").split(" ")[0]
        return f"{number} ({self.trial_id})" if re.fullmatch(r"t\d+", number) else self.trial_id

    @property
    def baseline(self) -> bool:
        """The sweep's no-distillation reference trial (spec baseline_trial)."""
        return self.run.data.tags.get(S.BASELINE_TAG) == "true"

    def best(self, metric: str) -> float | None:
        value = self.run.data.metrics.get(S.best_key(metric))
        return value if value is not None and math.isfinite(value) else None


def find_sweep(client, name: str | None = None, role: str = S.ROLE_SWEEP) -> Sweep:
    """The sweep's parent run by name, or the most recently started sweep in the store (with role
    ROLE_CONFIRMATION: a sweep's confirmation stage, by its name)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = (
        client.search_runs(
            experiments, S.sweep_filter(name, role), max_results=1, order_by=["attributes.start_time DESC"]
        )
        if experiments
        else []
    )
    if not runs:
        known = (
            sorted(
                {
                    r.data.tags.get(S.SWEEP_ID_TAG, "?")
                    for r in client.search_runs(experiments, S.sweep_filter(), max_results=50)
                }
            )
            if experiments and name
            else []
        )
        hint = (
            f" (sweeps in this store: {', '.join(known)})"
            if known
            else ": run one first (make demo, or make sweep SPEC=...)"
        )
        raise UserError(
            f"no sweep {'named ' + repr(name) + ' ' if name else ''}found in MLflow store {client.tracking_uri}{hint}"
        )
    run = runs[0]
    try:
        from mlflow.artifacts import load_dict

        spec = load_dict(f"{run.info.artifact_uri.rstrip('/')}/{S.SPEC_ARTIFACT}")
    except Exception:  # noqa: BLE001 - an older or hand-made sweep run: fall back to the logged params
        metric, mode = S.DEFAULT_OBJECTIVE
        spec = {
            "objective": {
                "metric": run.data.params.get(f"{S.SPEC_PARAM_PREFIX}objective.metric", metric),
                "mode": run.data.params.get(f"{S.SPEC_PARAM_PREFIX}objective.mode", mode),
            }
        }
    return Sweep(run, spec)


def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def sweep_trials(client, sweep: Sweep) -> list[Trial]:
    """Every trial run of the sweep (deleted orphans excluded), oldest first."""
    runs = client.search_runs(
        [sweep.experiment_id], S.trial_filter(sweep.name), max_results=10000, order_by=["attributes.start_time ASC"]
    )
    return [Trial(r, {k: _param_value(v) for k, v in r.data.params.items()}) for r in runs]


def metric_history(client, run_id: str, key: str) -> dict[int, float]:
    """{epoch: value} of one metric (the last value logged for each step)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def pareto_set(trials: list[Trial], objectives: list[tuple[str, str]]) -> list[Trial]:
    """Trials no other trial beats on every objective (and strictly on one)."""
    scored = [(t, [t.best(m) for m, _ in objectives]) for t in trials]
    scored = [(t, v) for t, v in scored if all(x is not None for x in v)]
    sign = [1.0 if mode == "max" else -1.0 for _, mode in objectives]

    def dominates(a: list[float], b: list[float]) -> bool:
        better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b))
        return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b))

    return [t for t, v in scored if not any(dominates(w, v) for _, w in scored)]


def rank(trials: list[Trial], metric: str, mode: str | None = None) -> list[Trial]:
    """Trials with a value of best_<metric>, best first (ties: the earlier trial)."""
    mode = mode or S.natural_mode(metric)
    with_value = [t for t in trials if t.best(metric) is not None]
    return sorted(with_value, key=lambda t: -t.best(metric) if mode == "max" else t.best(metric))
