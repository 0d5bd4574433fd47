"""`clockdistill sync SPEC`: write what Tune recorded in the sweep's storage into MLflow.

For a sweep whose MLflow writes could not all be made (the server was down past the driver's
patience, or the driver died with writes still buffered), or to copy a sweep into another store:
each trial's result.json rows become the per-epoch metrics of its run, created when missing and
found by trial_id otherwise (epochs already there are skipped); trials that ran their full budget
are closed FINISHED. Reads local paths and any pyarrow URI (s3://...).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from clockdistill.checkpoint import storage_filesystem
from sweeps.tracking import schema as S
from sweeps.tracking.writer import SweepTracker
from sweeps.tune.spec import SweepSpec, load_spec, search_space_summary, spec_to_dict, sweep_dir_name

log = logging.getLogger(__name__)


def _trials(spec: SweepSpec) -> list[tuple[str, dict[str, Any], list[dict[str, Any]], tuple[str, str] | None]]:
    """[(directory name, params, result rows, best checkpoint)] of every trial directory of the sweep."""
    import pyarrow.fs as pafs

    fs, root = storage_filesystem(spec.storage_path)
    base = f"{root.rstrip('/')}/{sweep_dir_name(spec.name)}"
    score = S.checkpoint_score(spec.primary.metric, spec.primary.mode)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("train_trial_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/params.json") as f:
                params = json.loads(f.read())
            with fs.open_input_stream(f"{info.path}/result.json") as f:
                rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        except (FileNotFoundError, OSError, json.JSONDecodeError) as exc:
            log.warning("sync: %s skipped (%s)", info.base_name, exc)
            continue
        if rows:
            out.append((info.base_name, params, rows, _best_checkpoint(fs, info.path, *score)))
    return out


def _best_checkpoint(fs, trial_dir: str, metric: str, mode: str) -> tuple[str, str] | None:
    """(path, sha256 of its weights) of the trial's kept checkpoint best in `metric` (as the sweep
    ranks its checkpoints: schema.checkpoint_score)."""
    import hashlib

    import pyarrow.fs as pafs

    sign = 1.0 if mode == "max" else -1.0
    best = None
    for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/meta.json") as f:
                value = json.loads(f.read()).get("metrics", {}).get(metric)
            with fs.open_input_stream(f"{info.path}/model.safetensors") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            continue
        score = sign * value if isinstance(value, (int, float)) else float("-inf")
        if best is None or score > best[0]:
            best = (score, info.path, digest)
    return (best[1], best[2]) if best else None


def sync_sweep(spec_path: str, name: str | None = None) -> dict[str, int]:
    spec = load_spec(spec_path, name)
    tracker = SweepTracker(
        spec.mlflow.tracking_uri or S.default_tracking_uri(), spec.mlflow.experiment, spec.name, spec.confirms
    )
    parent = tracker.find_parent()
    if parent is None:
        tracker.start_parent(spec_to_dict(spec), search_space_summary(spec), None)
        tracker.end_parent("FINISHED")
    else:
        tracker.parent_run_id = parent.info.run_id
    counts = {"trials": 0, "epochs_written": 0, "closed": 0}
    for dirname, params, rows, best in _trials(spec):
        trial_id = rows[-1]["trial_id"]
        label = S.trial_label(S.trial_number(dirname, trial_id), trial_id, params)
        run_id = tracker.trial_run(trial_id, label, S.searched_params(params), bool(params.get(S.BASELINE_KEY)))
        for row in rows[:1]:
            if S.CONFIG_KEY in row:  # the full config the trial built, with its first report
                tracker.log_params(run_id, json.loads(row[S.CONFIG_KEY]))
        counts["trials"] += 1
        counts["epochs_written"] += sum(tracker.log_epoch(run_id, row) for row in rows if S.FAILED_KEY not in row)
        run = tracker.client.get_run(run_id)
        if best and S.BEST_CHECKPOINT_TAG not in run.data.tags:  # what best-student reads
            tracker.tag_checkpoint(run_id, best[0], best[1])
        last = rows[-1]
        if last.get(S.FULL_BUDGET_KEY) and not tracker.is_done(tracker.client.get_run(run_id)):
            tracker.end_trial(
                run_id, "FINISHED", {S.FULL_BUDGET_TAG: "true", S.EPOCHS_RUN_TAG: str(int(last.get("epoch", 0)))}
            )
            counts["closed"] += 1
    print(
        f"sync {spec.name}: {counts['trials']} trials, {counts['epochs_written']} epoch(s) written, {counts['closed']} "
        "run(s) closed "
        f"-> {tracker.tracking_uri}"
    )
    return counts
