"""`clockdistill check SPEC`: the invariants a finished sweep must hold, whatever happened to it
(node losses, a killed driver, a tracking outage; issue "faults together"), read from what Tune
recorded in the sweep's storage and what MLflow holds:

    trials ended        every trial finished its budget, was stopped by the scheduler, or failed (after
                        the spec's max_failures retries) with its reason on record (Tune's error file)
    one run per trial   MLflow holds exactly one run per Tune trial, and none of a trial Tune never ran
    epochs once         every epoch a trial reported is in MLflow exactly once, with Tune's value
    steps forward       no metric was logged at a step below one logged before it (in time order)
    best agrees         the sweep's best trial by Tune's own results is best-student's pick

Each is printed as held or not with what broke it; the command exits 1 when one does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sweeps.tracking import schema as S


@dataclass(frozen=True)
class Invariant:
    name: str
    held: bool
    detail: str


def _trial_errors(spec) -> dict[str, str]:
    """{trial directory: the first line of its error file} (Tune writes error.txt when a trial fails)."""
    import pyarrow.fs as pafs

    from clockdistill.checkpoint import storage_filesystem
    from sweeps.tune.spec import sweep_dir_name

    fs, root = storage_filesystem(spec.storage_path)
    base = f"{root.rstrip('/')}/{sweep_dir_name(spec.name)}"
    errors = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("train_trial_"):
            try:
                with fs.open_input_stream(f"{info.path}/error.txt") as f:
                    text = f.read().decode(errors="replace").strip()
            except (FileNotFoundError, OSError):
                continue
            errors[info.base_name] = text.splitlines()[-1] if text else ""
    return errors


def _trials_ended(tune: dict, errors: dict[str, str], runs: list) -> Invariant:
    """Every trial finished its budget, was stopped by the scheduler, or failed with its reason."""
    # a trial with an error file failed at least once; it failed for good unless it then finished its
    # budget or its run ended without error (retried, then stopped by the scheduler)
    ran_ok = {t.trial_id for t in runs if t.status == "FINISHED"}
    finished_ids = {t for t, (_, rows) in tune.items() if rows[-1].get("completed_full_budget") == 1}
    errored = {t: errors[d] for t, (d, _) in tune.items() if d in errors}
    failed = {t: r for t, r in errored.items() if t not in finished_ids and t not in ran_ok}
    recovered = len(errored) - len(failed)
    unexplained = [t for t, (d, rows) in tune.items() if t not in failed and not rows]
    silent = [t for t, reason in failed.items() if not reason]  # (a trial fails for good after max_failures retries)
    finished = len(finished_ids)
    return Invariant(
        "trials ended",
        not (unexplained or silent),
        f"{len(tune)} trials: {finished} finished their budget, {len(tune) - finished - len(failed)} stopped "
        f"early, {len(failed)} failed"
        + (f" ({', '.join(f'{t}: {r[:80]}' for t, r in failed.items())})" if failed else "")
        + (f"; {recovered} recovered after a failure (retried from a checkpoint)" if recovered else "")
        + (f"; without results: {unexplained}" if unexplained else "")
        + (f"; failed without a reason: {silent}" if silent else ""),
    )


def check_invariants(spec_path: str, name: str | None = None, tracking_uri: str | None = None) -> list[Invariant]:
    from mlflow.tracking import MlflowClient

    from sweeps.results.best_student import choose_trial
    from sweeps.tracking.reader import find_sweep, sweep_trials
    from sweeps.tracking.sync import _trials
    from sweeps.tune.spec import load_spec

    spec = load_spec(spec_path, name)
    client = MlflowClient(tracking_uri or spec.mlflow.tracking_uri or S.default_tracking_uri())
    tune = {rows[0]["trial_id"]: (d, rows) for d, _, rows, _ in _trials(spec)}
    errors = _trial_errors(spec)
    sweep = find_sweep(client, spec.name)
    runs = sweep_trials(client, sweep)
    metric, best_key = spec.primary.metric, S.best_key(spec.primary.metric)
    out = []

    out.append(_trials_ended(tune, errors, runs))

    per_trial: dict[str, list[Any]] = {}
    for run in runs:
        per_trial.setdefault(run.trial_id, []).append(run)
    doubles = {t: len(r) for t, r in per_trial.items() if len(r) > 1}
    missing, strangers = sorted(set(tune) - set(per_trial)), sorted(set(per_trial) - set(tune))
    out.append(
        Invariant(
            "one run per trial",
            not (doubles or missing or strangers),
            f"{len(runs)} runs for {len(tune)} trials"
            + (f"; several runs: {doubles}" if doubles else "")
            + (f"; no run: {missing}" if missing else "")
            + (f"; runs of no Tune trial: {strangers}" if strangers else ""),
        )
    )

    wrong, backwards = [], []
    for trial_id, (_, rows) in tune.items():
        for run in per_trial.get(trial_id, [])[:1]:
            history = client.get_metric_history(run.run_id, metric)
            steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
            if any(b < a for a, b in zip(steps, steps[1:])):
                backwards.append(trial_id)
            logged: dict[int, list[float]] = {}
            for m in history:
                logged.setdefault(m.step, []).append(m.value)
            tune_epochs = {int(r["epoch"]): r[metric] for r in rows if metric in r and "epoch" in r}
            for epoch, value in tune_epochs.items():
                got = logged.get(epoch, [])
                if len(got) != 1 or not math.isclose(got[0], value, rel_tol=1e-9, abs_tol=1e-12):
                    wrong.append(f"{trial_id} epoch {epoch}: MLflow {got}, Tune {value:.6g}")
            wrong += [f"{trial_id} epoch {e}: in MLflow only" for e in sorted(set(logged) - set(tune_epochs))]
    out.append(
        Invariant("epochs once", not wrong, f"{metric} per epoch" + (f"; {'; '.join(wrong[:5])}" if wrong else ""))
    )
    out.append(
        Invariant("steps forward", not backwards, f"{metric}" + (f"; backwards in {backwards}" if backwards else ""))
    )

    baseline = {t.trial_id for t in runs if t.baseline}
    full = {t: rows[-1].get(best_key) for t, (_, rows) in tune.items() if rows[-1].get("completed_full_budget") == 1}
    full = {t: v for t, v in full.items() if t not in baseline and isinstance(v, (int, float))}
    sign = 1 if spec.primary.mode == "max" else -1
    by_tune = max(full, key=lambda t: sign * full[t]) if full else None
    try:
        pick = choose_trial(sweep, runs).trial.trial_id
    except Exception as exc:  # noqa: BLE001 - no candidate: its one-line reason is the detail
        pick = f"none ({exc})"
    out.append(Invariant("best agrees", by_tune == pick, f"Tune's best {by_tune}, best-student's pick {pick}"))
    return out


def print_invariants(invariants: list[Invariant]) -> None:
    width = max(len(i.name) for i in invariants)
    for inv in invariants:
        print(f"{inv.name:<{width}}  {'held' if inv.held else 'BROKEN'}  {inv.detail}")
