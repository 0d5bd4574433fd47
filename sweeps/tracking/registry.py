"""The model registry: the verified, exported best student as an MLflow model version with the
alias `champion`, tagged with its sweep and trial (never registered twice for one trial).

The alias is never repointed silently: a version carries the sha256 of the checkpoint it was
exported from (`checkpoint_sha256`), and the alias moves only to a version whose digest is the one
the sweep recorded for the trial; each move writes on the version who moved it (the MLflow user,
else the OS user), when (UTC), from which sweep and trial, with which held-out test AP, and which
version held the alias before (`champion.*` tags).
"""

from __future__ import annotations

import getpass
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from clockdistill import metrics as M
from clockdistill.errors import UserError
from sweeps.tracking import schema as S
from sweeps.tracking.reader import Sweep, Trial

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHECKPOINT_SHA_TAG = "checkpoint_sha256"  # on a version: the digest of the weights it was exported from


def register_student(
    client,
    sweep: Sweep,
    trial: Trial,
    out: Path,
    manifest: dict[str, Any],
    figures: dict[str, float] | None = None,
    checkpoint_sha: str = "",
) -> dict[str, Any]:
    """Log the TorchScript student on the trial's run, register it and set the `champion` alias, with
    `figures` (its held-out test AP, interval and selection gap) as version tags. A version of this
    sweep's trial that is already registered is reused, not duplicated. `checkpoint_sha`: the digest
    of the exported checkpoint's weights (checked against the trial's recorded one before the alias
    moves)."""
    import mlflow
    import mlflow.pytorch

    name = sweep.registered_model
    existing = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get(S.TRIAL_ID_TAG) == trial.trial_id and v.tags.get(S.SWEEP_ID_TAG) == sweep.name
    ]
    if existing:
        version = existing[0]
        print(f"model {name} version {version.version} already holds trial {trial.trial_id}: not registered again")
    else:
        mlflow.set_tracking_uri(client.tracking_uri)
        scripted = torch.jit.load(str(out / "student.torchscript.pt"))
        extra = [str(out / f) for f in ("MODEL_CARD.md", "config.json", "meta.json")]
        tags = {S.SWEEP_ID_TAG: sweep.name, S.TRIAL_ID_TAG: trial.trial_id, "AP": f"{manifest['metrics']['AP']:.6f}"}
        tags[CHECKPOINT_SHA_TAG] = checkpoint_sha
        tags.update({k: f"{v:.6f}" for k, v in (figures or {}).items()})
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its pickle warning does not apply: a ScriptModule is written by torch.jit.save
        try:
            with mlflow.start_run(run_id=trial.run_id):  # reopens the finished trial run; closed FINISHED again
                info = mlflow.pytorch.log_model(
                    scripted,
                    name="student",
                    serialization_format="pickle",
                    extra_files=extra,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    tags=tags,
                )
        finally:
            quiet.setLevel(level)
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        client.update_model_version(
            name,
            version.version,
            description=f"Best student of sweep {sweep.name} (trial {trial.trial_id}), "
            f"AP {manifest['metrics']['AP']:.4f}",
        )
        print(f"registered model {name} version {version.version}")
    move_champion(
        client,
        name,
        version,
        sweep,
        trial,
        figures,
        trial.run.data.tags.get(S.BEST_CHECKPOINT_SHA_TAG) or checkpoint_sha,
    )
    client.log_text(sweep.run_id, (out / "MODEL_CARD.md").read_text(), "best_student/MODEL_CARD.md")
    print(f"alias {CHAMPION} -> {name} version {version.version} (load with models:/{name}@{CHAMPION})")
    return {"model": name, "version": str(version.version), "alias": CHAMPION}


def move_champion(client, name: str, version, sweep: Sweep, trial: Trial, figures, recorded: str) -> None:
    """Point `champion` at `version` after checking its checkpoint digest is the trial's `recorded`
    one, and record the move on the version (module docstring)."""
    got = version.tags.get(CHECKPOINT_SHA_TAG, "")
    if not recorded or got != recorded:
        raise UserError(
            f"model {name} version {version.version}: its checkpoint sha256 "
            f"({got[:12] + '...' if got else 'not recorded'}) is not trial {trial.trial_id}'s recorded "
            f"{recorded[:12] + '...' if recorded else '(none)'}; refusing to point {CHAMPION} at it"
        )
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION).version
    except Exception:  # noqa: BLE001 - MLflow raises its own error for an alias no version holds
        previous = "none"
    client.set_registered_model_alias(name, CHAMPION, version.version)
    record = {
        "champion.set_by": os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser(),
        "champion.set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "champion.sweep": sweep.name,
        "champion.trial": trial.trial_id,
        "champion.test_AP": f"{figures[M.TEST_AP]:.6f}" if figures and M.TEST_AP in figures else "not measured",
        "champion.previous_version": str(previous),
    }
    for key, value in record.items():
        client.set_model_version_tag(name, version.version, key, value)
