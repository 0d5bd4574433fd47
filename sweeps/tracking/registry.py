"""The model registry: the verified, exported best student as an MLflow model version with the
alias `champion`, tagged with its sweep and trial (never registered twice for one trial)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sweeps.tracking import schema as S
from sweeps.tracking.reader import Sweep, Trial

log = logging.getLogger(__name__)

CHAMPION = "champion"


def register_student(
    client, sweep: Sweep, trial: Trial, out: Path, manifest: dict[str, Any], figures: dict[str, float] | None = None
) -> dict[str, Any]:
    """Log the TorchScript student on the trial's run, register it and set the `champion` alias, with
    `figures` (its held-out test AP, interval and selection gap) as version tags. A version of this
    sweep's trial that is already registered is reused, not duplicated."""
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
    client.set_registered_model_alias(name, CHAMPION, version.version)
    client.log_text(sweep.run_id, (out / "MODEL_CARD.md").read_text(), "best_student/MODEL_CARD.md")
    print(f"alias {CHAMPION} -> {name} version {version.version} (load with models:/{name}@{CHAMPION})")
    return {"model": name, "version": str(version.version), "alias": CHAMPION}
