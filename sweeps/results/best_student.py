"""`clockdistill best-student`: pick a sweep's winner, verify it, export it (export.py) and
register it (tracking/registry.py); it also measures the winner on the held-out test split (held_out.py).

    1. find the sweep in MLflow (the latest when not named) and its trials;
    2. candidates = trials that FINISHED their full budget (the no-distillation baseline trial of
       a spec with baseline_trial is a reference, not a candidate); the best by the objective (a
       multi-objective sweep: the Pareto set is printed and the best of it by --prefer, default
       the first objective, is taken);
    3. fetch that trial's best checkpoint (sweep storage; else the copy in its MLflow run),
       refuse it when its weights' sha256 differs from the one recorded at the end of the sweep, or
       when its AP re-evaluated on the validation split differs from the logged AP by more than
       the tolerance;
    4. measure the winner, the sweep's student alone and the teacher on the held-out test split, with
       bootstrap intervals (held_out.py; a data set without one gets a line saying so);
    5. export safetensors + config + TorchScript (+ ONNX) + a model card;
    6. log the TorchScript student as an MLflow model on the trial's run, register it (tags
       sweep_id, trial_id), point the alias `champion` at it. A trial already registered is not
       registered again: its version gets the alias.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric

from clockdistill.checkpoint import load_detector, storage_filesystem
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.data.index import file_digest
from clockdistill.errors import UserError
from sweeps.results.held_out import (
    ALONE,
    TEACHER,
    WINNER,
    Contender,
    held_out_report,
    run_metrics,
    table,
    test_annotations,
)
from sweeps.tracking import schema as S
from sweeps.tracking.reader import Sweep, Trial, find_sweep, metric_history, open_client, pareto_set, rank, sweep_trials

log = logging.getLogger(__name__)


@dataclass
class Choice:
    trial: Trial
    metric: str
    value: float
    pareto: list[Trial]


def choose_trial(sweep: Sweep, trials: list[Trial], metric: str | None = None, prefer: str | None = None) -> Choice:
    """The export candidate: among finished full-budget trials, the best by `metric` (default the
    primary objective); for a multi-objective sweep the best of the Pareto set by `prefer`."""
    candidates = [t for t in trials if t.finished and not t.baseline]
    if not candidates:
        states = (
            ", ".join(f"{t.trial_id} {t.status.lower()}{'' if t.full_budget else ' (stopped early)'}" for t in trials)
            or "none"
        )
        raise UserError(
            f"sweep {sweep.name}: no trial finished its full budget (trials: {states}); "
            "resume the sweep (launch it again) or give it more trials"
        )
    objectives = dict(sweep.objectives)
    pareto: list[Trial] = []
    if len(sweep.objectives) > 1 and metric is None:
        pareto = pareto_set(candidates, sweep.objectives)
        metric = prefer or sweep.objectives[0][0]
        if metric not in objectives:
            raise UserError(
                f"--prefer: expected one of the sweep's objectives ({', '.join(objectives)}), got {metric!r}"
            )
        pool = pareto
    else:
        metric = metric or sweep.objectives[0][0]
        pool = candidates
    mode = objectives.get(metric) or S.natural_mode(metric)
    ranked = rank(pool, metric, mode)
    if not ranked:
        raise UserError(
            f"--metric: no finished trial of sweep {sweep.name} logged best_{metric} "
            f"(the sweep's objectives: {', '.join(objectives)})"
        )
    return Choice(ranked[0], metric, ranked[0].best(metric), pareto)


def fetch_checkpoint(client, trial: Trial, dest: Path) -> tuple[Path, str]:
    """Copy the trial's best checkpoint to `dest`: from the sweep's storage (local path or a
    pyarrow-supported URI such as s3://), else from the copy logged to its MLflow run."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    source = trial.run.data.tags.get(S.BEST_CHECKPOINT_TAG, "")
    if source:
        try:
            fs, path = storage_filesystem(source)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                dest.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                return dest, source
            log.warning(
                "trial %s: checkpoint %s is not in the sweep storage any more; trying the copy in MLflow",
                trial.trial_id,
                source,
            )
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("trial %s: could not read %s (%s); trying the copy in MLflow", trial.trial_id, source, exc)
    try:
        local = client.download_artifacts(trial.run_id, S.CHECKPOINT_ARTIFACT, str(dest.parent))
        if (Path(local) / "model.safetensors").is_file():
            if Path(local) != dest:
                shutil.move(local, dest)
            return dest, f"mlflow run {trial.run_id} artifacts {S.CHECKPOINT_ARTIFACT}/"
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        log.debug("no checkpoint artifact: %s", exc)
    raise UserError(
        f"trial {trial.trial_id}: best checkpoint missing from the sweep storage "
        f"({source or f'no {S.BEST_CHECKPOINT_TAG} tag'}) "
        f"and from its MLflow run {trial.run_id}; check storage_path is mounted here, or rerun the trial"
    )


def verify_checkpoint(
    client, trial: Trial, checkpoint: Path, device: torch.device, tolerance: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Re-evaluate the checkpoint; returns (metrics, meta) or raises when it is not what was logged."""
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform
    from clockdistill.engine import evaluate

    recorded = trial.run.data.tags.get(S.BEST_CHECKPOINT_SHA_TAG)
    actual = file_digest(checkpoint / "model.safetensors") if recorded else None
    if recorded and actual != recorded:
        raise UserError(
            f"trial {trial.trial_id}: the checkpoint's weights changed after the sweep recorded them "
            f"(sha256 {actual[:12]}... != {recorded[:12]}...); refusing to export"
        )
    meta = read_meta(checkpoint)
    epoch = int(meta.get("metrics", {}).get("epoch", meta.get("epoch", 0) + 1))
    logged = metric_history(client, trial.run_id, "AP").get(epoch)
    if logged is None:
        raise UserError(
            f"trial {trial.trial_id}: MLflow has no AP for epoch {epoch} of its checkpoint; cannot verify it"
        )
    cfg = resolve_config(meta["config"])
    model, _ = load_detector(checkpoint, device)
    dataset = CocoDetection(cfg.data.root, cfg.data.val_split, DetectionTransform.for_data(cfg.data, train=False))
    metrics = evaluate(
        model, dataset, device, cfg.train.batch_size * 2, cfg.train.amp, canvas=cfg.data.canvas,
        num_workers=cfg.data.num_workers,
    )  # fmt: skip
    if abs(metrics["AP"] - logged) > tolerance:
        raise UserError(
            f"trial {trial.trial_id}: re-evaluated AP {metrics['AP']:.4f} differs from the logged {logged:.4f} "
            f"(epoch {epoch}) by more than {tolerance}; the checkpoint is not the one the sweep measured, refusing to "
            "export"
        )
    log.info(
        "trial %s: re-evaluated AP %.4f matches the logged %.4f (epoch %d)",
        trial.trial_id,
        metrics["AP"],
        logged,
        epoch,
    )
    return metrics, meta


def test_the_winner(
    client, sweep: Sweep, alone: Trial | None, winner: Trial, checkpoint: Path, meta: dict[str, Any], device
) -> dict[str, Any] | None:
    """The winner, the sweep's student alone (`alone`: its run, when it has one) and the teacher on the
    held-out test split (held_out.py), printed and logged on the winner's run; None (and a line saying
    so) without a test split."""
    root, teacher = meta["config"]["data"]["root"], meta["config"]["distill"]["teacher"]
    if not test_annotations(root).is_file():
        print(
            f"no test split in {root} ({test_annotations(root).relative_to(root)}): the winner is not measured on "
            "held-out images (clockdistill data synth --test N and data kitti write one)"
        )
        return None
    number = winner.name.split(" ")[0]
    contenders = [Contender(WINNER, f"best distilled student ({number})", checkpoint, winner.best("AP"))]
    with tempfile.TemporaryDirectory() as tmp:
        if alone is not None:
            path, _ = fetch_checkpoint(client, alone, Path(tmp) / "alone")
            contenders.append(
                Contender(ALONE, f"student alone ({alone.name.split(' ')[0]}, no KD)", path, alone.best("AP"))
            )
        if teacher and (Path(teacher) / "meta.json").is_file():
            preset = read_meta(teacher)["config"]["model"]["preset"]
            contenders.append(Contender(TEACHER, f"teacher ({preset})", Path(teacher), sweep.teacher_ap))
        report = held_out_report(contenders, root, device)
    print(table(report))
    client.log_batch(
        winner.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in run_metrics(report).items()]
    )
    return report


def best_student(
    sweep_name: str | None = None,
    metric: str | None = None,
    prefer: str | None = None,
    out: str | Path = "artifacts/best-student",
    tracking_uri: str | None = None,
    tolerance: float = 2e-3,
    device: str = "auto",
    register: bool = True,
    confirm: int = 0,
    seeds: int = 3,
    verbose: bool = False,
) -> dict[str, Any]:
    """The whole command; returns the export manifest (also written as export.json). `confirm` K > 0:
    first the confirmation stage (confirm.py: the top K settings and the student alone on `seeds` new
    seeds), and the champion comes from it."""
    from clockdistill.engine import select_device
    from sweeps.results.export import export_files
    from sweeps.tracking.registry import register_student

    client = open_client(tracking_uri)
    sweep = find_sweep(client, sweep_name)
    trials = sweep_trials(client, sweep)
    confirmation, seed_figures = None, None
    if confirm:
        confirmation, seed_figures = confirm_settings(client, sweep, trials, confirm, seeds, device, verbose)
        sweep, trials = confirmation.sweep, confirmation.trials
        champion = confirmation.champion
        choice = Choice(champion, confirmation.metric, champion.best(confirmation.metric), [])
    else:
        choice = choose_trial(sweep, trials, metric, prefer)
    if choice.pareto:
        names = [m for m, _ in sweep.objectives]
        print(f"Pareto set of sweep {sweep.name} ({' vs '.join(names)}), best by {choice.metric} taken:")
        for t in rank(choice.pareto, choice.metric, dict(sweep.objectives)[choice.metric]):
            print(
                f"  {'*' if t is choice.trial else ' '} trial {t.name}: "
                + ", ".join(f"{m} {t.best(m):.4g}" for m in names)
            )
    print(
        f"sweep {sweep.name}: {len(trials)} trials, {sum(t.finished for t in trials)} finished their budget; "
        f"best by {choice.metric}: trial {choice.trial.name} ({choice.value:.4f})"
    )
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, source = fetch_checkpoint(client, choice.trial, Path(tmp) / "checkpoint")
        metrics, meta = verify_checkpoint(client, choice.trial, checkpoint, select_device(device), tolerance)
        checkpoint_sha = file_digest(checkpoint / "model.safetensors")
        alone = (
            confirmation.alone_for(choice.trial)
            if confirmation
            else next((t for t in trials if t.baseline and t.finished), None)
        )
        held_out = test_the_winner(client, sweep, alone, choice.trial, checkpoint, meta, select_device(device))
        manifest = export_files(
            checkpoint, meta, metrics, out, sweep=sweep, trial=choice.trial, source=source, held_out=held_out
        )
    if seed_figures is not None:
        manifest["confirmation"] = seed_figures
        (out / "export.json").write_text(json.dumps(manifest, indent=1))
    if register:
        figures = run_metrics(held_out) if held_out else None
        manifest["registered"] = register_student(client, sweep, choice.trial, out, manifest, figures, checkpoint_sha)
        (out / "export.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def confirm_settings(client, sweep: Sweep, trials: list[Trial], top: int, seeds: int, device: str, verbose: bool):
    """The confirmation stage (confirm.py), its table printed and its figures logged on the stage's run."""
    from clockdistill.engine import select_device
    from sweeps.results.confirm import measure_test, run_confirmation, seed_table

    confirmation = run_confirmation(client, sweep, trials, top, seeds, verbose)
    measured = measure_test(client, confirmation, select_device(device))
    text, figures = seed_table(confirmation)
    print(text)
    if not measured:
        print("no test split: the settings are compared on validation only")
    client.log_dict(confirmation.sweep.run_id, figures, "confirmation.json")
    return confirmation, {"stage": confirmation.sweep.name, "seeds": confirmation.seeds, "settings": figures}
