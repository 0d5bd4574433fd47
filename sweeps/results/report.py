"""The sweep report: every trial in one Parquet table, and the pictures people would rather look at.

    clockdistill report [--sweep NAME] [--out DIR] [--baseline-ap AP]

writes to DIR (default artifacts/report/<sweep>) and logs it all under `report/` of the sweep's
MLflow run, so the MLflow UI shows it:

    trials.parquet        one row per trial: ids, status, budget reached, best objective values,
                          the searched knobs (param.<key>), the full config (JSON), per-epoch metrics
                          (epoch and metric.<name> as lists aligned by position)
    ap_over_epochs.png    the objective per epoch for every trial, teacher and no-KD baseline lines
    ap_vs_knobs.png       best objective against each searched knob
    param_importance.png  Optuna's fANOVA importance of the knobs (finished trials; stopped ones too when < 3 finished)
    pareto_front.png      multi-objective sweeps only
    method_comparison.png a sweep over distill.method (or variant): per method AP over seeds, paired differences to
    methods.json          the student alone and the best baseline with 95% intervals (sweeps/results/study.py)
    samples.png           validation images: ground truth, teacher and best-student boxes
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from clockdistill.metrics import COCO_METRICS, EVALUATED_METRICS, LOSS, LOSS_PARTS, LR
from sweeps.results import plots
from sweeps.tracking.reader import Sweep, Trial, find_sweep, metric_history, open_client, pareto_set, rank, sweep_trials

log = logging.getLogger(__name__)

EPOCH_METRICS = (*COCO_METRICS, LOSS, *LOSS_PARTS, LR)
SCORE_THRESHOLD = 0.3  # boxes drawn in the sample grid ...
MIN_SCORE = 0.05  # ... or, for a model with fewer confident boxes than the image has objects, its top ones above this


def _searched(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """{dotted key: {kind: value}} of the searched (not fixed) keys."""
    space = sweep.spec.get("search_space") or {}
    return {k: v for k, v in space.items() if isinstance(v, dict) and next(iter(v), "fixed") != "fixed"}


def trial_rows(client, sweep: Sweep, trials: list[Trial]) -> list[dict[str, Any]]:
    searched = _searched(sweep)
    rows = []
    for t in trials:
        histories = {k: metric_history(client, t.run_id, k) for k in EPOCH_METRICS if k in t.run.data.metrics}
        epochs = sorted({e for h in histories.values() for e in h})
        rows.append(
            {
                "trial_id": t.trial_id,
                "run_id": t.run_id,
                "run_name": t.run.info.run_name,
                "status": t.status,
                "completed_full_budget": t.full_budget,
                "epochs_run": int(t.run.data.metrics.get("epoch", len(epochs))),
                "best": {m: t.best(m) for m, _ in sweep.objectives},
                "params": {k: t.params.get(k) for k in searched},
                "config": t.params,
                "epochs": epochs,
                "metrics": {k: [h.get(e) for e in epochs] for k, h in histories.items()},
            }
        )
    return rows


def write_table(rows: list[dict[str, Any]], objectives: list[tuple[str, str]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, pa.Array] = {}
    for name in ("trial_id", "run_id", "run_name", "status"):
        columns[name] = pa.array([r[name] for r in rows], pa.string())
    columns["completed_full_budget"] = pa.array([r["completed_full_budget"] for r in rows], pa.bool_())
    columns["epochs_run"] = pa.array([r["epochs_run"] for r in rows], pa.int32())
    for metric, _ in objectives:
        columns[f"best_{metric}"] = pa.array([r["best"].get(metric) for r in rows], pa.float64())
    for key in rows[0]["params"] if rows else {}:
        values = [r["params"].get(key) for r in rows]
        try:
            columns[f"param.{key}"] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds of choices
            columns[f"param.{key}"] = pa.array([None if v is None else str(v) for v in values], pa.string())
    columns["config"] = pa.array([json.dumps(r["config"], sort_keys=True) for r in rows], pa.string())
    columns["epoch"] = pa.array([r["epochs"] for r in rows], pa.list_(pa.int32()))
    for key in sorted({k for r in rows for k in r["metrics"]}):
        columns[f"metric.{key}"] = pa.array([r["metrics"].get(key, []) for r in rows], pa.list_(pa.float64()))
    pq.write_table(pa.table(columns), path)
    return path


def _distribution(kind: str, value: Any):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if kind == "uniform":
        return FloatDistribution(*value)
    if kind == "loguniform":
        return FloatDistribution(*value, log=True)
    if kind == "int":
        return IntDistribution(*value)
    return CategoricalDistribution(list(value))  # choice, grid


def importances(rows: list[dict[str, Any]], sweep: Sweep) -> tuple[dict[str, float], str]:
    """fANOVA importance of each searched knob for the primary objective, over the finished trials
    (and the early-stopped ones, at their best value, when fewer than 3 finished); with a note of
    which trials it used."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = sweep.objectives[0]
    dists = {k: _distribution(*next(iter(v.items()))) for k, v in _searched(sweep).items()}
    scored = [
        r
        for r in rows
        if r["status"] != "FAILED" and r["best"].get(metric) is not None and math.isfinite(r["best"][metric])
    ]
    finished = [r for r in scored if r["completed_full_budget"]]
    used, note = (
        (finished, f"{len(finished)} finished trials")
        if len(finished) >= 3
        else (scored, f"{len(scored)} trials incl. stopped")
    )
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in used:
        params = {k: v for k, v in r["params"].items() if k in dists and v is not None}
        try:
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions={k: dists[k] for k in params}, value=r["best"][metric]
                )
            )
        except ValueError as exc:  # a value outside the declared space (a hand-edited spec)
            log.warning("importance: trial %s left out (%s)", r["trial_id"], exc)
    if len(study.trials) < 2:
        raise ValueError(f"{len(study.trials)} trial(s) with a {metric}; importance needs at least 2")
    return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)), note


def _detections(model, dataset, indices: list[int]):
    import torch

    from clockdistill.data.transforms import collate
    from clockdistill.evaluation.coco import postprocess

    images, mask, targets = collate([dataset[i] for i in indices])
    with torch.no_grad():
        out = model(images, mask)
    return postprocess(out, torch.stack([t["orig_size"] for t in targets]), top_k=30)


def samples(client, best: Trial, sweep: Sweep, path: Path, n: int = 4) -> Path:
    """Ground truth, teacher and best-student boxes on the first n validation images."""
    import torch

    from clockdistill.checkpoint import load_detector
    from clockdistill.config.layers import resolve_config
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform
    from sweeps.results.best_student import fetch_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, _ = fetch_checkpoint(client, best, Path(tmp) / "student")
        student, meta = load_detector(checkpoint, "cpu")
    teacher, _ = load_detector(sweep.spec["teacher"], "cpu")
    cfg = resolve_config(meta["config"])
    dataset = CocoDetection(cfg.data.root, cfg.data.val_split, DetectionTransform.for_data(cfg.data, train=False))
    indices = list(range(min(n, len(dataset))))
    names = dataset.class_names
    predicted = [_detections(m, dataset, indices) for m in (teacher, student)]
    panels = []
    for row, i in enumerate(indices):
        boxes, cats, crowd = dataset.index.annotations(i)
        gt = [
            (list(map(float, b)), names[dataset.cat_to_label[int(c)]], None)
            for b, c, k in zip(boxes, cats, crowd)
            if not k
        ]
        cells = [(dataset.load_image(i), gt)]
        for det in predicted:
            d = det[row]  # sorted by score
            keep = d["scores"] >= SCORE_THRESHOLD
            if int(keep.sum()) < len(gt):  # a weak model: its top boxes anyway, as many as the ground truth
                keep = (d["scores"] >= MIN_SCORE) & (torch.arange(len(d["scores"])) < max(1, len(gt)))
            cells.append(
                (
                    dataset.load_image(i),
                    [
                        (b.tolist(), names[int(lab)], float(s))
                        for b, lab, s in zip(d["boxes"][keep], d["labels"][keep], d["scores"][keep])
                    ],
                )
            )
        panels.append(cells)
    columns = [
        "ground truth",
        f"teacher (AP {sweep.teacher_ap:.3f})" if sweep.teacher_ap is not None else "teacher",
        f"best student {best.trial_id} (AP {best.best('AP') or 0:.3f})",
    ]
    return plots.sample_grid(panels, columns, path)


def _baseline(rows: list[dict[str, Any]], metric: str) -> float | None:
    """The best full-budget trial of the sweep that ran without distillation (distill.method none)."""
    values = [
        r["best"].get(metric)
        for r in rows
        if r["config"].get("distill.method") == "none"
        and r["completed_full_budget"]
        and r["best"].get(metric) is not None
    ]
    return max(values) if values else None


def build_report(
    sweep_name: str | None = None,
    out: str | Path | None = None,
    tracking_uri: str | None = None,
    baseline_ap: float | None = None,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    client = open_client(tracking_uri)
    sweep = find_sweep(client, sweep_name)
    trials = sweep_trials(client, sweep)
    out = Path(out or Path("artifacts") / "report" / sweep.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(client, sweep, trials)
    metric, mode = sweep.objectives[0]
    written = {"table": str(write_table(rows, sweep.objectives, out / "trials.parquet"))}
    skipped: dict[str, str] = {}
    curve_metric = metric if metric in EVALUATED_METRICS else "AP"
    baseline = baseline_ap if baseline_ap is not None else _baseline(rows, curve_metric)
    written["ap_over_epochs"] = str(
        plots.ap_over_epochs(rows, curve_metric, sweep.teacher_ap, baseline, out / "ap_over_epochs.png")
    )
    searched = {k: next(iter(v)) for k, v in _searched(sweep).items()}
    if searched:
        written["ap_vs_knobs"] = str(plots.metric_vs_knobs(rows, searched, metric, out / "ap_vs_knobs.png"))
    try:
        values, note = importances(rows, sweep)
        written["param_importance"] = str(
            plots.importance_bars(values, metric, f"fANOVA, {note}", out / "param_importance.png")
        )
    except (ValueError, RuntimeError) as exc:
        skipped["param_importance"] = str(exc)
    if "distill.method" in searched or "variant" in searched:
        from sweeps.results import study

        comparison = study.compare_methods(rows)
        if len(comparison["methods"]) >= 2:
            (out / "methods.json").write_text(json.dumps(comparison, indent=1, default=str))
            written["methods"] = str(out / "methods.json")
            written["method_comparison"] = str(study.method_comparison_plot(comparison, out / "method_comparison.png"))
            print(study.format_table(comparison))
        else:
            skipped["method_comparison"] = "fewer than two methods with a full-budget trial"
    finished = [t for t in trials if t.finished]
    if len(sweep.objectives) > 1:
        front = {t.trial_id for t in pareto_set(finished, sweep.objectives)}
        written["pareto_front"] = str(
            plots.pareto_front(
                [r for r in rows if r["completed_full_budget"]], sweep.objectives, front, out / "pareto_front.png"
            )
        )
    ranked = rank(finished, metric, mode)
    if ranked:
        try:
            written["samples"] = str(samples(client, ranked[0], sweep, out / "samples.png"))
        except Exception as exc:  # noqa: BLE001 - a missing checkpoint or data set must not cost the rest of the report
            skipped["samples"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        skipped["samples"] = "no trial finished its full budget"
    for name, reason in skipped.items():
        print(f"report: {name} skipped: {reason}")
    if log_to_mlflow:
        client.log_artifacts(sweep.run_id, str(out), "report")
    summary = {
        "sweep": sweep.name,
        "out": str(out),
        "trials": len(rows),
        "files": written,
        "skipped": skipped,
        "baseline_ap": baseline,
        "logged_to": f"run {sweep.run_id} artifacts report/" if log_to_mlflow else None,
    }
    print(
        f"report of sweep {sweep.name}: {len(rows)} trials -> {out} "
        f"({', '.join(Path(p).name for p in written.values())})"
        + (f"; logged to MLflow run {sweep.run_id} under report/" if log_to_mlflow else "")
    )
    return summary
