"""`clockdistill best-student` against a real finished sweep (real Ray, real MLflow SQLite store)."""

import json
import shutil
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, tune_results
from sweeps.results.held_out import WINNER
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow


def _best_student(sweep, out: Path, *extra: str):
    return run_cli("best-student", "--tracking-uri", sweep["tracking_uri"], "--out", str(out), *extra)


@pytest.fixture(scope="module")
def exported(tiny_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "best"
    proc = _best_student(tiny_sweep, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads((out / "export.json").read_text()), proc


def test_picks_the_trial_the_tune_results_say_is_best_and_its_ap_reproduces(tiny_sweep, exported):
    out, manifest, proc = exported
    results = tune_results(tiny_sweep["storage"], "tiny")
    assert len(results) == 4
    full = {t: rows for t, rows in results.items() if rows[-1]["completed_full_budget"] == 1}
    assert full  # (whether ASHA stops one depends on timing; the choice rules are tested below with stopped trials)
    best = max(full, key=lambda t: full[t][-1]["best_AP"])
    assert manifest["trial_id"] == best == tiny_sweep["summary"]["best"]["trial_id"]
    logged_ap = {r["epoch"]: r for r in results[best]}[manifest["epoch"]]["AP"]
    assert manifest["metrics"]["AP"] == pytest.approx(logged_ap, abs=2e-3)
    assert manifest["metrics"]["AP"] > 0.3  # a real detector, not an empty one
    # the export directory is a checkpoint the evaluate command accepts, with the same AP
    proc = run_cli("evaluate", "--checkpoint", str(out), "--data", str(tiny_sweep["data"]), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["AP"] == pytest.approx(manifest["metrics"]["AP"], abs=1e-6)


def test_each_trials_params_are_the_config_it_trained_with(tiny_sweep, exported):
    """The trial builds its config once and reports it with its first epoch; the driver writes that
    as the run's params: for the exported winner they are the checkpoint's own config."""
    from mlflow.tracking import MlflowClient

    from clockdistill.config.dotted import flatten_dict

    client = MlflowClient(tiny_sweep["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], S.trial_filter("tiny"))
    results = tune_results(tiny_sweep["storage"], "tiny")
    assert len(runs) == len(results) == 4
    _, manifest, _ = exported
    for run in runs:
        built = json.loads(results[run.data.tags[S.TRIAL_ID_TAG]][0][S.CONFIG_KEY])
        searched = S.searched_params(results[run.data.tags[S.TRIAL_ID_TAG]][0]["config"])
        assert set(run.data.params) == set(built) and set(searched) <= set(built)
        assert all(run.data.params[k] == (v if isinstance(v, str) else json.dumps(v)) for k, v in built.items()
                   if k not in searched)  # fmt: skip
        if run.data.tags[S.TRIAL_ID_TAG] == manifest["trial_id"]:
            trained = flatten_dict(json.loads((exported[0] / "config.json").read_text()))
            trained.pop("train.output_dir")
            assert trained == {k: v for k, v in built.items() if k != S.VARIANT_KEY}


def test_export_files_torchscript_matches_eager_and_the_card_says_what_it_is(tiny_sweep, exported):
    from clockdistill.checkpoint import load_detector
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform, collate
    from clockdistill.exporters import pad_to

    out, manifest, _ = exported
    for name in (
        "model.safetensors",
        "meta.json",
        "config.json",
        "student.torchscript.pt",
        "MODEL_CARD.md",
        "export.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["distill"]["method"] == "clockdistill"
    eager, meta = load_detector(out, "cpu")
    ds = CocoDetection(tiny_sweep["data"], "val", DetectionTransform(128, train=False))
    images, mask, _ = collate([ds[i] for i in (1, 3, 5)])  # not the batch the export was traced on
    images, mask = pad_to(images, mask, 128)
    scripted = torch.jit.load(str(out / "student.torchscript.pt"))
    with torch.no_grad():
        ref = eager(images, mask)
        logits, boxes = scripted(images, mask)
    assert torch.allclose(logits, ref["pred_logits"], atol=1e-5) and torch.allclose(boxes, ref["pred_boxes"], atol=1e-5)
    with pytest.raises(Exception, match="pad to the export size"):
        scripted(images[:, :, :96], mask[:, :96])
    card = (out / "MODEL_CARD.md").read_text()
    for fact in (
        "sweep `tiny`",
        manifest["trial_id"],
        f"{manifest['metrics']['AP']:.4f}",
        "APl",
        "parameters",
        "latency",
        "`train.lr`",
        "Teacher AP (reference)",
        str(tiny_sweep["data"]),
    ):
        assert fact in card, fact
    assert (
        manifest["student"]["params"] > 0
        and manifest["student"]["cpu_latency_ms"] > 0
        and manifest["teacher"]["cpu_latency_ms"] > 0
    )


def test_onnx_export_agrees_with_onnxruntime(exported):
    pytest.importorskip("onnxruntime", reason="the optional onnx extra is not installed")
    out, manifest, _ = exported
    assert (out / "student.onnx").is_file() and manifest["onnx_max_abs_diff"] < 1e-4


def test_registered_with_alias_champion_and_a_second_run_adds_no_version(tiny_sweep, exported, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, manifest, _ = exported
    client = MlflowClient(tiny_sweep["tracking_uri"])
    champion = client.get_model_version_by_alias("hybrid-tiny-student", "champion")
    assert champion.tags[S.TRIAL_ID_TAG] == manifest["trial_id"] and champion.tags[S.SWEEP_ID_TAG] == "tiny"
    assert manifest["registered"] == {
        "model": "hybrid-tiny-student",
        "version": str(champion.version),
        "alias": "champion",
    }
    before = len(client.search_model_versions("name = 'hybrid-tiny-student'"))
    proc = _best_student(tiny_sweep, tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not registered again" in proc.stdout
    assert len(client.search_model_versions("name = 'hybrid-tiny-student'")) == before
    assert client.get_model_version_by_alias("hybrid-tiny-student", "champion").version == champion.version
    mlflow.set_tracking_uri(tiny_sweep["tracking_uri"])
    loaded = mlflow.pytorch.load_model("models:/hybrid-tiny-student@champion")
    images = torch.zeros(1, 3, 128, 128)
    logits, _ = loaded(images, torch.zeros(1, 128, 128, dtype=torch.bool))
    assert logits.shape[:2] == (1, json.loads((tmp_path / "again" / "config.json").read_text())["model"]["num_queries"])
    # the move is recorded on the version: who, when, from which sweep and trial, with which test AP
    tags = client.get_model_version("hybrid-tiny-student", champion.version).tags
    trial_run = client.get_run(champion.run_id)  # (the student is logged on its trial's run)
    assert trial_run.data.tags[S.TRIAL_ID_TAG] == manifest["trial_id"]
    assert tags["checkpoint_sha256"] == trial_run.data.tags[S.BEST_CHECKPOINT_SHA_TAG]
    assert (tags["champion.sweep"], tags["champion.trial"]) == ("tiny", manifest["trial_id"])
    assert tags["champion.set_by"] and tags["champion.previous_version"] == str(champion.version)
    set_at = datetime.fromisoformat(tags["champion.set_at"])
    assert timedelta(0) <= datetime.now(timezone.utc) - set_at < timedelta(hours=1)
    report = json.loads((tmp_path / "again" / "export.json").read_text())["test"]
    assert tags["champion.test_AP"] == (f"{report['models'][WINNER]['AP']:.6f}" if report else "not measured")
    # a version whose checkpoint digest is not the trial's recorded one: the alias is not moved
    client.set_model_version_tag("hybrid-tiny-student", champion.version, "checkpoint_sha256", "0" * 64)
    try:
        proc = _best_student(tiny_sweep, tmp_path / "tampered")
        assert proc.returncode != 0 and "refusing to point champion at it" in proc.stderr.strip().splitlines()[-1]
        assert client.get_model_version_by_alias("hybrid-tiny-student", "champion").version == champion.version
    finally:
        client.set_model_version_tag(
            "hybrid-tiny-student", champion.version, "checkpoint_sha256", tags["checkpoint_sha256"]
        )


def test_confirmation_retrains_the_top_settings_on_new_seeds_and_resumes(tiny_sweep, exported, tmp_path):
    """--confirm 2 --seeds 2: the top two settings by validation AP and the student alone, each on two new
    seeds, run as a second Tune run nested under the sweep in MLflow; the champion is the best run of the
    best mean; launched again, the stage reruns nothing."""
    from mlflow.tracking import MlflowClient

    proc = _best_student(tiny_sweep, tmp_path / "c", "--confirm", "2", "--seeds", "2", "--no-register")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the settings are the sweep's top two by its own results (no stopped trial among the candidates:
    # whether ASHA stops one depends on timing, so there may be one)
    sweep_rows = {t: rows[-1] for t, rows in tune_results(tiny_sweep["storage"], "tiny").items()}
    full = sorted((r for r in sweep_rows.values() if r["completed_full_budget"] == 1), key=lambda r: -r["best_AP"])
    top_lrs = {r["config"]["train.lr"] for r in full[:2]}
    results = tune_results(tiny_sweep["storage"], "tiny-confirm2x2")
    assert len(results) == 2 * (len(top_lrs) + 1), proc.stdout[-3000:]
    assert all(rows[-1]["completed_full_budget"] == 1 for rows in results.values())
    configs = {t: {**json.loads(rows[0][S.CONFIG_KEY]), **rows[0]["config"]} for t, rows in results.items()}
    distilled = [c for c in configs.values() if c["variant"] != "alone"]
    assert {c["train.lr"] for c in distilled} == top_lrs and {c["train.seed"] for c in configs.values()} == {1, 2}
    assert {c["distill.method"] for c in configs.values() if c["variant"] == "alone"} == {"none"}
    assert sum(c["variant"] == "alone" for c in configs.values()) == 2
    # the champion: the best seed run of the setting whose mean best_AP over seeds is highest
    by_setting = {}
    for t, rows in results.items():
        by_setting.setdefault(configs[t]["variant"], {})[t] = rows[-1]["best_AP"]
    best = max((v for k, v in by_setting.items() if k != "alone"), key=lambda v: sum(v.values()) / len(v))
    manifest = json.loads((tmp_path / "c" / "export.json").read_text())
    assert manifest["trial_id"] == max(best, key=best.get)
    settings = manifest["confirmation"]["settings"]
    assert set(settings) == set(by_setting) and all(len(f["test"]) == 2 for f in settings.values())
    assert "gain over alone" in proc.stdout and "champion: setting" in proc.stdout
    # MLflow: the stage's run is nested under the sweep's, its trial runs carry the confirms tag
    client = MlflowClient(tiny_sweep["tracking_uri"])
    experiment = client.get_experiment_by_name("tiny").experiment_id
    stage = client.search_runs([experiment], S.sweep_filter("tiny-confirm2x2", S.ROLE_CONFIRMATION))
    parent = client.search_runs([experiment], S.sweep_filter("tiny"))[0]
    assert len(stage) == 1 and stage[0].data.tags[S.PARENT_RUN_TAG] == parent.info.run_id
    runs = client.search_runs([experiment], S.trial_filter("tiny-confirm2x2"))
    assert len(runs) == len(results) and all(r.data.tags[S.CONFIRMS_TAG] == "tiny" for r in runs)
    # launched again: the finished stage resumes and reruns nothing
    again = _best_student(tiny_sweep, tmp_path / "d", "--confirm", "2", "--seeds", "2", "--no-register")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = tune_results(tiny_sweep["storage"], "tiny-confirm2x2")
    assert {t: len(r) for t, r in rerun.items()} == {t: len(r) for t, r in results.items()}
    assert len(client.search_runs([experiment], S.trial_filter("tiny-confirm2x2"))) == len(results)
    assert json.loads((tmp_path / "d" / "export.json").read_text())["trial_id"] == manifest["trial_id"]


def _checkpoint_dir(sweep, trial_id: str) -> Path:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], S.trial_filter("tiny", trial_id))[0]
    return Path(run.data.tags[S.BEST_CHECKPOINT_TAG]), run


def test_a_tampered_checkpoint_is_refused(tiny_sweep, exported, tmp_path):
    from mlflow.tracking import MlflowClient

    _, manifest, _ = exported
    ckpt, run = _checkpoint_dir(tiny_sweep, manifest["trial_id"])
    weights = ckpt / "model.safetensors"
    backup = tmp_path / "model.safetensors"
    shutil.copy(weights, backup)
    client = MlflowClient(tiny_sweep["tracking_uri"])
    from safetensors.torch import load_file, save_file

    try:
        state = load_file(weights)
        state = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, weights)
        proc = _best_student(tiny_sweep, tmp_path / "x", "--no-register")
        assert proc.returncode == 2 and "changed after the sweep recorded them" in proc.stderr, proc.stderr[-1500:]
        # without the recorded hash the re-evaluation still catches it
        sha = run.data.tags[S.BEST_CHECKPOINT_SHA_TAG]
        client.delete_tag(run.info.run_id, S.BEST_CHECKPOINT_SHA_TAG)
        try:
            proc = _best_student(tiny_sweep, tmp_path / "y", "--no-register")
            assert proc.returncode == 2 and "re-evaluated AP" in proc.stderr and "refusing to export" in proc.stderr, (
                proc.stderr[-1500:]
            )
        finally:
            client.set_tag(run.info.run_id, S.BEST_CHECKPOINT_SHA_TAG, sha)
    finally:
        shutil.copy(backup, weights)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_errors_say_what_to_do(tiny_sweep, tmp_path):
    proc = _best_student(tiny_sweep, tmp_path / "o", "--sweep", "nope")
    assert (
        proc.returncode == 2
        and "no sweep named 'nope' found" in proc.stderr
        and "sweeps in this store: tiny" in proc.stderr
    )
    proc = run_cli("best-student", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert proc.returncode == 2 and "no MLflow store at" in proc.stderr and "make demo" in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = run_cli("best-student", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert proc.returncode == 2 and "is unreachable" in proc.stderr and time.monotonic() - t0 < 60
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_checkpoint_missing_everywhere_is_reported(tiny_sweep, exported, tmp_path):
    _, manifest, _ = exported
    ckpt, run = _checkpoint_dir(tiny_sweep, manifest["trial_id"])
    artifacts = Path(run.info.artifact_uri.replace("file://", "")) / "best_checkpoint"
    moved = [(ckpt, tmp_path / "ckpt"), (artifacts, tmp_path / "art")]
    for src, dst in moved:
        shutil.move(src, dst)
    try:
        proc = _best_student(tiny_sweep, tmp_path / "o", "--no-register")
    finally:
        for src, dst in moved:
            shutil.move(dst, src)
    assert proc.returncode == 2 and "best checkpoint missing from the sweep storage" in proc.stderr, proc.stderr[-1500:]


def _trial(trial_id, status="FINISHED", full=True, **best):
    tags = {"trial_id": trial_id, "completed_full_budget": "true" if full else "false"}
    run = SimpleNamespace(
        info=SimpleNamespace(status=status, run_id=trial_id),
        data=SimpleNamespace(tags=tags, metrics={f"best_{k}": v for k, v in best.items()}),
    )
    from sweeps.tracking.reader import Trial

    return Trial(run)


def test_choice_rules_single_and_multi_objective():
    from clockdistill.errors import UserError
    from sweeps.results.best_student import choose_trial
    from sweeps.tracking.reader import Sweep

    single = Sweep(
        SimpleNamespace(data=SimpleNamespace(tags={"sweep_id": "s"}, metrics={}, params={})),
        {"objective": {"metric": "AP", "mode": "max"}},
    )
    trials = [
        _trial("a", AP=0.5),
        _trial("b", full=False, AP=0.9),
        _trial("c", status="FAILED", full=False, AP=0.8),
        _trial("d", AP=0.6),
    ]
    assert choose_trial(single, trials).trial.trial_id == "d"  # b stopped early, c failed: not candidates
    with pytest.raises(UserError, match="no trial finished its full budget"):
        choose_trial(single, trials[1:3])
    multi = Sweep(
        single.run, {"objectives": [{"metric": "AP", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]}
    )
    trials = [
        _trial("fast", AP=0.4, latency_ms=5.0),
        _trial("good", AP=0.7, latency_ms=20.0),
        _trial("worse", AP=0.39, latency_ms=6.0),
        _trial("mid", AP=0.6, latency_ms=10.0),
    ]
    choice = choose_trial(multi, trials)
    assert {t.trial_id for t in choice.pareto} == {"fast", "good", "mid"} and choice.trial.trial_id == "good"
    assert choose_trial(multi, trials, prefer="latency_ms").trial.trial_id == "fast"
    with pytest.raises(UserError, match="--prefer: expected one of"):
        choose_trial(multi, trials, prefer="params")


def test_the_invariant_checker_holds_on_the_sweep_and_names_what_breaks(tiny_sweep, tmp_path):
    """`clockdistill check` on the tiny sweep: every invariant held; on a copy of its store with one
    epoch logged twice, one logged out of order and a run of no Tune trial, those three break."""
    from mlflow.tracking import MlflowClient

    from sweeps.results.invariants import check_invariants

    proc = run_cli("check", str(tiny_sweep["spec"]), "--tracking-uri", tiny_sweep["tracking_uri"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.count(" held ") == 5 and "BROKEN" not in proc.stdout
    db = tmp_path / "copy.db"
    shutil.copy(tiny_sweep["tracking_uri"][len("sqlite:///") :], db)
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tiny")
    run = client.search_runs([exp.experiment_id], S.trial_filter("tiny"))[0]
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "AP"))
    client.log_metric(run.info.run_id, "AP", 0.5, step=last)  # the last epoch again, after it
    client.log_metric(run.info.run_id, "AP", 0.5, step=0)  # and a step below it
    parent = client.search_runs([exp.experiment_id], S.sweep_filter("tiny"))[0]
    stray = client.create_run(exp.experiment_id, tags={**run.data.tags, S.TRIAL_ID_TAG: "ffff0000"})
    client.set_terminated(stray.info.run_id)
    assert parent.info.run_id != stray.info.run_id
    held = {i.name: i for i in check_invariants(str(tiny_sweep["spec"]), tracking_uri=f"sqlite:///{db}")}
    assert {n for n, i in held.items() if not i.held} == {"one run per trial", "epochs once", "steps forward"}
    assert (
        "ffff0000" in held["one run per trial"].detail and run.data.tags[S.TRIAL_ID_TAG] in held["epochs once"].detail
    )
