"""Writing the verified best student out: its files and model card (the registry: tracking/registry.py).

<out>/model.safetensors     student weights
<out>/meta.json             checkpoint metadata (config, class names): `clockdistill evaluate --checkpoint <out>` works
<out>/config.json           the full config the student was trained with
<out>/student.torchscript.pt   TorchScript, fixed input size (see exporters.py)
<out>/student.onnx          ONNX (with the optional `onnx` extra), checked with onnxruntime
<out>/MODEL_CARD.md         data, teacher, knobs, metrics, size and CPU latency, provenance
<out>/export.json           the same facts as JSON, plus the registered model version
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from clockdistill.checkpoint import load_detector
from clockdistill.config.layers import resolve_config
from clockdistill.errors import UserError
from clockdistill.exporters import max_abs_difference, onnx_available, pad_to, to_onnx, to_torchscript
from clockdistill.latency import cpu_latency_ms, parameter_count
from clockdistill.metrics import COCO_METRICS
from sweeps.results.held_out import gain_sentence
from sweeps.tracking.reader import Sweep, Trial

log = logging.getLogger(__name__)

TORCHSCRIPT_TOLERANCE = 1e-4


def _test_batch(cfg, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n validation images padded to the export size."""
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform, collate

    dataset = CocoDetection(cfg.data.root, cfg.data.val_split, DetectionTransform.for_data(cfg.data, train=False))
    images, mask, _ = collate([dataset[i] for i in range(min(n, len(dataset)))])
    return pad_to(images, mask, cfg.data.max_size)


def _teacher_facts(path: str, size: int) -> dict[str, Any]:
    try:
        teacher, meta = load_detector(path, "cpu")
    except UserError as exc:
        log.warning("teacher %s not readable here (%s): the card leaves out its size and latency", path, exc)
        return {"path": path, "preset": None}
    return {
        "path": path,
        "preset": meta["config"]["model"]["preset"],
        "params": parameter_count(teacher),
        "cpu_latency_ms": cpu_latency_ms(teacher, size),
    }


def export_files(
    checkpoint: Path,
    meta: dict[str, Any],
    metrics: dict[str, float],
    out: Path,
    *,
    sweep: Sweep,
    trial: Trial,
    source: str,
    held_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = resolve_config(meta["config"])
    size = cfg.data.max_size
    model, _ = load_detector(checkpoint, "cpu")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(checkpoint / "model.safetensors", out / "model.safetensors")
    slim = {k: meta[k] for k in ("config", "class_names", "label_to_cat", "epoch", "metrics") if k in meta}
    (out / "meta.json").write_text(json.dumps(slim, indent=1))
    (out / "config.json").write_text(json.dumps(meta["config"], indent=1))

    example = _test_batch(cfg)
    scripted = to_torchscript(model, example, size)
    scripted.save(str(out / "student.torchscript.pt"))
    with torch.no_grad():
        eager = model(*example)
        diff = max_abs_difference(
            torch.jit.load(str(out / "student.torchscript.pt"))(*example), (eager["pred_logits"], eager["pred_boxes"])
        )
    if diff > TORCHSCRIPT_TOLERANCE:
        raise UserError(
            f"TorchScript export: outputs differ from the eager model by {diff:.2e} (> {TORCHSCRIPT_TOLERANCE}); not "
            "exported"
        )
    files = ["model.safetensors", "meta.json", "config.json", "student.torchscript.pt"]
    onnx_diff = None
    if onnx_available():
        onnx_diff = to_onnx(model, example, out / "student.onnx")
        if onnx_diff > TORCHSCRIPT_TOLERANCE:
            raise UserError(
                f"ONNX export: onnxruntime's outputs differ from the eager model by {onnx_diff:.2e}; not exported"
            )
        files.append("student.onnx")
    else:
        log.info("ONNX skipped: install the onnx extra (pip install 'clockdistill[onnx]') for student.onnx")

    searched = sweep.searched_keys
    manifest = {
        "sweep": sweep.name,
        "sweep_run_id": sweep.run_id,
        "trial_id": trial.trial_id,
        "trial_run_id": trial.run_id,
        "checkpoint_source": source,
        "epoch": slim.get("metrics", {}).get("epoch"),
        "data": cfg.data.root,
        "val_split": cfg.data.val_split,
        "classes": meta.get("class_names"),
        "input_size": size,
        "student": {
            "preset": cfg.model.preset,
            "params": parameter_count(model),
            "cpu_latency_ms": cpu_latency_ms(model, size),
        },
        "teacher": {
            **_teacher_facts(cfg.distill.teacher or sweep.spec.get("teacher", ""), size),
            "AP": sweep.teacher_ap,
        },
        "knobs": {k: trial.params.get(k) for k in searched},
        "method": cfg.distill.method,
        "metrics": {k: metrics[k] for k in COCO_METRICS if k in metrics},
        "test": held_out,  # the held-out test split (held_out.py), or None without one
        "torchscript_max_abs_diff": diff,
        "onnx_max_abs_diff": onnx_diff,
        "files": files + ["MODEL_CARD.md", "export.json"],
    }
    (out / "MODEL_CARD.md").write_text(model_card(manifest))
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    print(f"exported trial {trial.name} (AP {metrics['AP']:.4f}) to {out}: {', '.join(files)}")
    return manifest


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _test_section(report: dict[str, Any] | None) -> str:
    if not report:
        return (
            "## Held-out test split\nNone in this data set: nothing here was measured on images the sweep did not "
            "choose on."
        )
    level = int(round(100 * report["level"]))
    rows = "\n".join(
        f"| {m['label']} | {_fmt(m.get('selection_AP'))} | {m['AP']:.4f} [{m['low']:.4f}, {m['high']:.4f}] |"
        for m in report["models"].values()
    )
    return f"""## Held-out test split
{report["images"]} images ({report["data"]}) that no trial read; AP with its {level}% bootstrap interval over images
({report["resamples"]} resamples).

| model | selection AP (val) | test AP [{level}% interval] |
|---|---|---|
{rows}

{gain_sentence(report)}."""


def model_card(m: dict[str, Any]) -> str:
    s, t = m["student"], m["teacher"]
    speedup = (
        f"{t['cpu_latency_ms'] / s['cpu_latency_ms']:.2f}x" if t.get("cpu_latency_ms") and s["cpu_latency_ms"] else "-"
    )
    shrink = f"{t['params'] / s['params']:.2f}x" if t.get("params") else "-"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in m["metrics"].items())
    knobs = "\n".join(f"| `{k}` | {v} |" for k, v in m["knobs"].items()) or "| (none) | |"
    return f"""# Distilled student: {s["preset"]} from sweep `{m["sweep"]}`

A DETR student trained with knowledge distillation (`distill.method = {m["method"]}`) from a
{t.get("preset") or "teacher"} teacher, picked as the best finished trial of its sweep and verified
by re-evaluation before export.

## Data
- Data set: `{m["data"]}` (validation split `{m["val_split"]}`)
- Classes: {", ".join(m["classes"] or [])}
- Input: images resized to a longest side of {m["input_size"]}, zero-padded to {m["input_size"]} x {m["input_size"]}

## Accuracy (validation split, re-evaluated at export)
The sweep chose this student as the best of its trials on this split, so these figures are optimistic.

| metric | student |
|---|---|
{rows}

Teacher AP (reference): {_fmt(t.get("AP"))}

{_test_section(m.get("test"))}

## Size and speed (CPU, one image, median)
| | student | teacher | ratio |
|---|---|---|---|
| parameters | {s["params"]:,} | {t.get("params") and f"{t['params']:,}" or "-"} | {shrink} smaller |
| latency | {_fmt(s["cpu_latency_ms"], ".1f")} ms | {_fmt(t.get("cpu_latency_ms"), ".1f")} ms | {speedup} faster |

## Winning knobs
| key | value |
|---|---|
{knobs}

## Provenance
- Sweep `{m["sweep"]}` (MLflow run `{m["sweep_run_id"]}`)
- Trial `{m["trial_id"]}` (run `{m["trial_run_id"]}`), epoch {m["epoch"]}
- Checkpoint read from: {m["checkpoint_source"]}
- Teacher checkpoint: `{t.get("path")}`
- TorchScript max |difference| to the eager model on a validation batch: {m["torchscript_max_abs_diff"]:.1e}
"""
