"""The embedded default end to end: synthetic data -> the teacher -> the demo sweep (with its
no-distillation trial) -> report and best student -> teacher / student alone / distilled student.

The teacher is a checkpoint the project ships (sweeps/assets/demo-teacher: weights, metadata and
recipe.json with the command that made it, its sha256 and its AP), so the demo's minutes go to the
sweep. `make demo-teacher` rebuilds it (`clockdistill demo build-teacher`): run it when the
hybrid-tiny-teacher architecture changes (a test fails when the shipped weights no longer load).
`clockdistill demo --teacher-epochs N` trains a teacher in the work directory instead.

Each stage is skipped when its output already exists (a trained teacher resumes from its checkpoint,
the sweep of the same name resumes and reruns nothing finished), so running the demo again is quick.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from clockdistill.checkpoint import epochs_done
from clockdistill.config.dotted import parse_yaml
from clockdistill.config.layers import resolve_config
from clockdistill.data.index import file_digest
from clockdistill.data.synth import ensure_synthetic
from clockdistill.errors import UserError
from clockdistill.metrics import TEACHER_AP
from sweeps.results.held_out import ALONE, TEACHER, WINNER, gain_sentence
from sweeps.tune.console import short_path

log = logging.getLogger(__name__)

# Tuned for a 2-core CPU: lr and clipping suit training from scratch (no pretrained backbone here).
TRAIN = {"lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 1.0, "warmup_iters": 200, "batch_size": 8}
TEACHER_PRESET = "hybrid-tiny-teacher"
SHIPPED_TEACHER = Path(__file__).parent / "assets" / "demo-teacher"
# The students' own pretrained weights (sweeps/assets/demo-student): the student preset trained alone on
# other images of the same generator (seed 1, none of the demo's), as a real student starts from weights
# pretrained elsewhere; every demo trial, the no-KD one included, starts from them (train.init_from)
STUDENT_PRESET = "hybrid-tiny-student"
SHIPPED_STUDENT = Path(__file__).parent / "assets" / "demo-student"
STUDENT_DATA = {"train": 2000, "val": 300, "seed": 1}
STUDENT_EPOCHS = 15
# The shipped teacher's recipe: synthetic seed-0 images (the demo's data are their first n), 30 epochs
TEACHER_DATA = {"train": 2000, "val": 300, "seed": 0}
TEACHER_EPOCHS = 30
# The efficacy study's teacher (sweeps/configs/ablation.yaml): the shipped one trained on with the same
# recipe on three times the images (more of the same generator: on its 2000 images a second cycle
# overfits, AP 0.49-0.50), so that it is worth distilling (AP >= 0.5).
STUDY_TEACHER = {"train_images": 6000, "epochs": 6}


def demo_config(name: str, data: Path, preset: str, epochs: int, out: Path, progress: bool = True, **train: Any):
    """TRAIN for `epochs` into `out`; `train` overrides further train keys."""
    return resolve_config(
        {
            "name": name,
            "data": {"root": str(data)},
            "model": {"preset": preset},
            "train": {**TRAIN, "epochs": epochs, "output_dir": str(out), "progress": progress, **train},
        }
    )


def demo_spec(workdir: Path, trials: int | None = None, epochs: int | None = None) -> Path:
    """sweeps/configs/demo.yaml with its teacher and storage under `workdir` (written there)."""
    spec: dict[str, Any] = parse_yaml((Path(__file__).parent / "configs" / "demo.yaml").read_text())
    spec.update(teacher=str(workdir / "teacher" / "best"), storage_path=str(workdir / "sweeps"))
    spec["config"]["train"]["init_from"] = str(check_shipped(SHIPPED_STUDENT, STUDENT_PRESET, "make demo-student"))
    if trials:
        spec["num_samples"] = trials
    if epochs:
        spec["epochs"] = epochs
        spec["scheduler"] = {
            **spec.get("scheduler", {}),
            "grace_period": max(1, min(spec["scheduler"].get("grace_period", 1), epochs - 1)),
        }
    path = workdir / "demo-sweep.yaml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path


# -- the shipped teacher ---------------------------------------------------------------------------


def build_teacher(out: Path, workdir: Path, threads: int = 1) -> dict[str, Any]:
    """Train the demo teacher by its recipe and write it to `out` (weights, metadata without machine
    paths, recipe.json). What `make demo-teacher` runs."""
    import torch

    from clockdistill.engine import fit

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = ensure_synthetic(workdir / "data", TEACHER_DATA["train"], TEACHER_DATA["val"], TEACHER_DATA["seed"])
    fit(demo_config("demo-teacher", data, TEACHER_PRESET, TEACHER_EPOCHS, workdir / "teacher", False))
    return package_teacher(workdir / "teacher" / "best", out, time.perf_counter() - t0, threads)


def build_study_teacher(workdir: Path, threads: int = 1) -> tuple[Path, float]:
    """The efficacy study's teacher in `workdir`/teacher/best: the shipped demo teacher trained on by
    STUDY_TEACHER (images in `workdir`/teacher-data), and the students' data in `workdir`/data (the
    recipe's 2000/300 images: the first of the teacher's, the same validation split). Reused when done."""
    import torch

    from clockdistill.engine import fit

    torch.set_num_threads(threads)
    n_train, seed = STUDY_TEACHER["train_images"], TEACHER_DATA["seed"]
    ensure_synthetic(workdir / "data", TEACHER_DATA["train"], TEACHER_DATA["val"], seed)
    data = ensure_synthetic(workdir / "teacher-data", n_train, TEACHER_DATA["val"], seed)
    best = workdir / "teacher" / "best"
    epochs = STUDY_TEACHER["epochs"]
    if epochs_done(best.parent) >= epochs:  # finished: reuse it
        ap = json.loads((best / "meta.json").read_text())["best_ap"]
        log.info("study teacher: %s exists (AP %.4f)", short_path(best), ap)
        return best, ap
    start = install_teacher(workdir / "shipped-teacher", data)
    log.info("study teacher: the shipped one + %d epochs on %d images -> %s", epochs, n_train, short_path(best.parent))
    cfg = demo_config("study-teacher", data, TEACHER_PRESET, epochs, best.parent, init_from=str(start))
    return best, fit(cfg).best_ap


def build_student(out: Path, workdir: Path, threads: int = 1, preset: str = STUDENT_PRESET) -> dict[str, Any]:
    """Pretrain a student preset's starting weights by the demo students' recipe (STUDENT_DATA,
    STUDENT_EPOCHS) and write them to `out`. What `make demo-student` runs (for the demo's preset)."""
    import torch

    from clockdistill.engine import fit

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = ensure_synthetic(workdir / "data", STUDENT_DATA["train"], STUDENT_DATA["val"], STUDENT_DATA["seed"], test=0)
    fit(demo_config("demo-student", data, preset, STUDENT_EPOCHS, workdir / "student", False))
    own = preset == STUDENT_PRESET
    command = f"clockdistill demo build-student{'' if own else ' --preset ' + preset} --out {out}"
    recipe = {
        "command": f"make demo-student  ({command})" if own else command,
        "preset": preset,
        "data": {"synthetic": STUDENT_DATA},
        "train": {**TRAIN, "epochs": STUDENT_EPOCHS},
    }
    return package_checkpoint(workdir / "student" / "best", out, recipe, time.perf_counter() - t0, threads)


def package_teacher(best: Path, out: Path, wall_s: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """A trained teacher checkpoint -> the shipped form (package_checkpoint)."""
    recipe = {
        "command": "make demo-teacher  (clockdistill demo build-teacher --out sweeps/assets/demo-teacher)",
        "preset": TEACHER_PRESET,
        "data": {"synthetic": TEACHER_DATA},
        "train": {**TRAIN, "epochs": TEACHER_EPOCHS},
    }
    return package_checkpoint(best, out, recipe, wall_s, threads)


def package_checkpoint(
    best: Path, out: Path, recipe: dict[str, Any], wall_s: float | None = None, threads: int | None = None
) -> dict[str, Any]:
    """A trained checkpoint -> the shipped form: weights, metadata (data root and output dir left
    blank: they are this machine's) and recipe.json (how it was made, its AP, its weights' sha256)."""
    import torch

    meta = json.loads((best / "meta.json").read_text())
    meta["config"]["data"]["root"] = ""
    meta["config"]["train"]["output_dir"] = ""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(best / "model.safetensors", out / "model.safetensors")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    recipe = {
        **recipe,
        "AP": meta["best_ap"],
        "AP50": meta["metrics"].get("AP50"),
        "best_epoch": meta["best_epoch"],
        "sha256": file_digest(out / "model.safetensors"),
        "torch": torch.__version__,
        "threads": threads,
        "wall_min": round(wall_s / 60, 1) if wall_s else None,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(
        f"{recipe['preset']}: AP {recipe['AP']:.4f} (epoch {recipe['best_epoch']}) -> {out}, sha256 {recipe['sha256']}"
    )
    return recipe


def check_shipped(shipped: Path, preset: str, rebuild: str) -> Path:
    """A shipped checkpoint (`shipped`), refused when its weights are not the ones its recipe.json
    names or no longer fit `preset`; `rebuild` says how to make it again."""
    from clockdistill.checkpoint import load_detector

    recipe = json.loads((shipped / "recipe.json").read_text())
    digest = file_digest(shipped / "model.safetensors")
    if digest != recipe["sha256"]:
        raise UserError(
            f"{shipped / 'model.safetensors'}: sha256 {digest[:12]}.. is not the recipe's {recipe['sha256'][:12]}..; "
            f"restore it (git checkout) or rebuild it with `{rebuild}`"
        )
    try:
        load_detector(shipped, "cpu")
    except Exception as exc:  # noqa: BLE001 - a key or shape mismatch: the architecture changed since
        raise UserError(
            f"{shipped}: the shipped checkpoint no longer fits {preset} ({str(exc).splitlines()[0][:200]}); "
            f"rebuild it with `{rebuild}`"
        ) from None
    return shipped.resolve()


def install_teacher(dest: Path, data: Path, shipped: Path = SHIPPED_TEACHER) -> Path:
    """The shipped teacher as a checkpoint in the work directory, reading `data` (check_shipped first)."""
    check_shipped(shipped, TEACHER_PRESET, "make demo-teacher")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "model.safetensors", dest / "model.safetensors")
    meta = json.loads((shipped / "meta.json").read_text())
    meta["config"]["data"]["root"] = str(data.resolve())
    meta["config"]["train"]["output_dir"] = str(dest.parent.resolve())
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    return dest


def evaluate_checkpoint(checkpoint: Path, data: Path) -> dict[str, float]:
    """COCO metrics of a checkpoint on the validation split of `data`."""
    import torch

    from clockdistill.checkpoint import load_detector
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform
    from clockdistill.engine import evaluate

    model, meta = load_detector(checkpoint, "cpu")
    d = meta["config"]["data"]
    dataset = CocoDetection(
        str(data), "val", DetectionTransform(d["max_size"], False, square=d.get("resize") == "square")
    )
    return evaluate(model, dataset, torch.device("cpu"), batch_size=16)


def prepare_teacher(workdir: Path, data: Path, teacher_epochs: int | None) -> tuple[Path, float]:
    """(teacher checkpoint, its AP on the demo's validation split): the shipped teacher, or one
    trained here for `teacher_epochs`."""
    best = workdir / "teacher" / "best"
    if teacher_epochs:
        from clockdistill.engine import fit

        log.info("training the teacher (%s, %d epochs) -> %s", TEACHER_PRESET, teacher_epochs, best.parent)
        return best, fit(demo_config("teacher", data, TEACHER_PRESET, teacher_epochs, best.parent)).best_ap
    install_teacher(best, data)
    metrics = evaluate_checkpoint(best, data)
    meta = json.loads((best / "meta.json").read_text())
    meta.update(best_ap=metrics["AP"], metrics={**meta["metrics"], **metrics})  # this validation split's figures
    (best / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("teacher: the shipped %s (AP %.4f on %s)", TEACHER_PRESET, metrics["AP"], short_path(data))
    return best, metrics["AP"]


def prepare_study(workdir: Path, n_train: int, n_val: int, n_test: int) -> tuple[Path, float]:
    """The fair study's data (the demo's generator, `n_test` held-out images) and the shipped teacher
    under `workdir` (sweeps/configs/study.yaml); (teacher checkpoint, its validation AP)."""
    data = ensure_synthetic(workdir / "data", n_train, n_val, TEACHER_DATA["seed"], test=n_test)
    return prepare_teacher(workdir, data, None)


# -- the demo --------------------------------------------------------------------------------------


def run_demo(
    workdir: Path,
    n_train: int,
    n_val: int,
    teacher_epochs: int | None = None,
    trials: int | None = None,
    sweep_epochs: int | None = None,
    verbose: bool = False,
    n_test: int = 300,
) -> dict[str, Any]:
    from sweeps.tune.driver import run_sweep

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_synthetic(workdir / "data", n_train, n_val, TEACHER_DATA["seed"], test=n_test)
    teacher, teacher_ap = prepare_teacher(workdir, data, teacher_epochs)
    t1 = time.perf_counter()
    log.info("running the demo sweep (one line per trial event; --verbose for Ray's own output)")
    summary = run_sweep(demo_spec(workdir, trials, sweep_epochs), verbose=verbose)
    t2 = time.perf_counter()
    best, baseline = summary.get("best") or {}, summary.get("baseline") or {}
    exported = _report_and_export(summary["sweep"], workdir) if best else {}
    t3 = time.perf_counter()
    held_out = (exported.get("export") or {}).get("test") or {"models": {}}
    rows = [("teacher (" + TEACHER_PRESET + ")", teacher_ap, held_out["models"].get(TEACHER), teacher)]
    if baseline:
        label = f"student alone ({_number(baseline)}, no KD)"
        rows.append((label, baseline.get("best_AP"), held_out["models"].get(ALONE), baseline.get("best_checkpoint")))
    if best:
        label = f"best distilled student ({_number(best)})"
        rows.append((label, best["best_AP"], held_out["models"].get(WINNER), best.get("best_checkpoint")))
    print()
    print(results_table(rows))
    if best:
        if held_out["models"]:
            print(gain_sentence(held_out))
        elif baseline and baseline.get("best_AP") is not None:  # no test split (--test 0): say what was measured
            gain = (best["best_AP"] - baseline["best_AP"]) * 100
            print(f"the best distilled trial is {gain:+.1f} AP over the student alone on the validation images it was "
                  "chosen on (optimistic: no test split)")  # fmt: skip
        knobs = best.get("label", "").partition(" ")[2]
        print(f"winning knobs: {knobs} (its full config: {short_path(workdir / 'best-student' / 'config.json')})")
        print(
            f"exported: {short_path(workdir / 'best-student')}   report: {short_path(workdir / 'report')}   "
            "runs: make mlflow-ui"
        )
    else:
        print("no distilled trial of the sweep ran its full budget")
    print(
        f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min (data and teacher {(t1 - t0) / 60:.1f} min, "
        f"sweep {(t2 - t1) / 60:.1f} min, report and export {(t3 - t2) / 60:.1f} min)"
    )
    return {TEACHER_AP: teacher_ap, "best": best, "baseline": baseline, **exported}


def results_table(rows: list[tuple[str, float | None, dict[str, float] | None, Any]]) -> str:
    """model / val AP (what the sweep chose on) / test AP with its interval (held out) / parameters /
    CPU latency (a one-image forward at the data's max size), with each model's size and speed
    against the first row's (the teacher's)."""
    from clockdistill.checkpoint import load_detector
    from clockdistill.latency import cpu_latency_ms, parameter_count

    facts = []
    for name, ap, test, path in rows:
        params = latency = None
        if path and Path(str(path)).is_dir():
            model, meta = load_detector(path, "cpu")
            params, latency = parameter_count(model), cpu_latency_ms(model, meta["config"]["data"]["max_size"])
        facts.append((name, ap, test, params, latency))
    ref_params, ref_latency = facts[0][3], facts[0][4]
    lines = [
        f"{'model':<36} {'val AP':>7} {'test AP [95% interval]':>24} {'params':>8} {'CPU latency':>12}  vs teacher"
    ]
    for i, (name, ap, test, params, latency) in enumerate(facts):
        ap_text = f"{ap:.4f}" if isinstance(ap, (int, float)) else "-"
        test_text = f"{test['AP']:.4f} [{test['low']:.4f}, {test['high']:.4f}]" if test else "-"
        p_text = f"{params / 1e6:.2f}M" if params else "-"
        l_text = f"{latency:.1f} ms" if latency else "-"
        versus = (
            f"{ref_params / params:.2f}x smaller, {ref_latency / latency:.2f}x faster"
            if i and params and latency and ref_params and ref_latency
            else ""
        )
        lines.append(f"{name:<36} {ap_text:>7} {test_text:>24} {p_text:>8} {l_text:>12}  {versus}".rstrip())
    return "\n".join(lines)


def _number(row: dict[str, Any]) -> str:
    return str(row.get("label", row.get("trial_id", "?"))).split(" ")[0]


def _report_and_export(sweep: str, workdir: Path) -> dict[str, Any]:
    """The sweep report and `best-student` into the work directory; a failure here is reported, and
    the finished sweep stays as it is."""
    from sweeps.results.best_student import best_student
    from sweeps.results.report import build_report

    done: dict[str, Any] = {}
    try:
        done["report"] = build_report(sweep, workdir / "report")
        done["export"] = best_student(sweep, out=workdir / "best-student")
    except UserError as exc:
        print(f"demo: {exc}")
    return done
