"""Sweep specs: validation before Ray starts, translation to Tune, Optuna's view of pruned trials."""

import json
import re

import pytest

from sweeps.tracking import schema as S
from sweeps.tune.search import build_scheduler, build_searcher, paper_defaults_point, tune_param_space
from sweeps.tune.spec import SpecError, load_spec, parse_spec, resolve_paths, spec_from_json, spec_to_json

BASE = {
    "name": "t",
    "teacher": "x",
    "epochs": 3,
    "search_space": {
        "distill.memory.alpha": {"loguniform": [1e-6, 1e-2]},
        "distill.logit.groups": {"int": [1, 3]},
        "distill.logit.temperature": {"choice": [1, 2, 4, 10]},
        "distill.memory.beta": {"fixed": 1e-7},
        "distill.logit.cls_weight": {"uniform": [0.5, 4.0]},
    },
}


def _spec(**changes):
    data = {**BASE, **changes}
    return parse_spec({k: v for k, v in data.items() if v is not None}, "s.yaml")


@pytest.mark.parametrize(
    "changes,expected",
    [
        (
            {"search_space": {"distill.memory.alpah": {"uniform": [1, 2]}}},
            "s.yaml: search_space.distill.memory.alpah: unknown config key",
        ),
        (
            {"search_space": {"distill.memory.alpha": {"uniform": [2, 2]}}},
            "search_space.distill.memory.alpha.uniform: low must be < high",
        ),
        (
            {"search_space": {"distill.memory.alpha": {"uniform": [3, 2]}}},
            "search_space.distill.memory.alpha.uniform: low must be < high",
        ),
        (  # no trial can read the held-out test split, whichever way a spec points at it
            {"config": {"data": {"val_split": "test"}}},
            "s.yaml: config: data.val_split: 'test' is the held-out test split",
        ),
        (
            {"search_space": {"data.train_split": {"choice": ["train", "test"]}}},
            "search_space.data.train_split.choice: data.train_split: 'test' is the held-out test split",
        ),
        (
            {"search_space": {"distill.memory.alpha": {"loguniform": [0, 1]}}},
            "search_space.distill.memory.alpha.loguniform: low must be > 0",
        ),
        (
            {"search_space": {"distill.logit.temperature": {"choice": []}}},
            "search_space.distill.logit.temperature.choice: expected a non-empty list",
        ),
        (
            {"search_space": {"distill.logit.temperature": {"choice": [2, -1]}}},
            "search_space.distill.logit.temperature.choice: distill.logit.temperature: expected a value > 0",
        ),
        (
            {"search_space": {"distill.memory.alpha": {"normal": [0, 1]}}},
            "search_space.distill.memory.alpha.normal: unknown key",
        ),
        (
            {"search_space": {"distill.memory.alpha": {"uniform": [0, 1], "fixed": 1}}},
            "search_space.distill.memory.alpha: expected exactly one of",
        ),
        ({"search_space": {"distill.memory.beta": {"fixed": 1e-7}}}, "search_space: nothing to search"),
        ({"search_space": {"train.epochs": {"int": [1, 4]}}}, "search_space.train.epochs: set by the sweep itself"),
        (
            {"search": {"algorithm": "bayes"}},
            "search.algorithm: Input should be 'tpe', 'gp', 'cmaes', 'random' or 'grid', got 'bayes'",
        ),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type: Input should be"),
        ({"scheduler": {"type": "asha", "grace_period": 3}}, "scheduler.grace_period: must be < epochs (3), got 3"),
        ({"teacher": None}, "s.yaml: teacher: required"),
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"config": {"trian": {"lr": 1}}}, "config.trian: unknown section"),
        ({"config": {"train": {"lr": "fast"}}}, "config: train.lr: expected a number"),
        ({"objective": {"metric": "mAP"}}, "objective.metric: Input should be"),
        (
            {"search_space": {"distill.method": {"grid": ["none", "clockdistill"]}}},
            "grid values need search.algorithm: grid",
        ),
        (
            {"objectives": [{"metric": "AP"}, {"metric": "params", "mode": "min"}], "search": {"algorithm": "cmaes"}},
            "cmaes cannot optimise several objectives",
        ),
        ({"scheduler": {"type": "pbt"}}, "scheduler.type: pbt mutates running trials itself"),
        ({"name": "my sweep!"}, "name: String should match pattern"),
        (
            {"baseline_trial": True, "search": {"algorithm": "grid"}, "search_space": {"train.lr": {"grid": [1e-4]}}},
            "baseline_trial: needs a searcher",
        ),
        (
            {"baseline_trial": True, "search_space": {"distill.method": {"choice": ["clockdistill", "fitnet"]}}},
            "baseline_trial: distill.method is searched already",
        ),
        ({"variants": {"a": {"distill.method": "none"}}}, "variants: defined but not searched"),
        (
            {"search_space": {"variant": {"choice": ["a"]}}},
            "search_space.variant: names a variant, but the spec has no",
        ),
        (
            {"variants": {"a": {"distill.method": "none"}}, "search_space": {"variant": {"choice": ["a", "b"]}}},
            "search_space.variant: 'b' is not a variant (known: a)",
        ),
        (
            {"variants": {"a": {"distill.memory.alpah": 1.0}}, "search_space": {"variant": {"choice": ["a"]}}},
            "variants.a.distill.memory.alpah: unknown config key",
        ),
        (
            {"variants": {"a": {"distill.method": "fitnets"}}, "search_space": {"variant": {"choice": ["a"]}}},
            "variants.a: distill.method: expected one of",
        ),
        (  # NCCL stops with "Duplicate GPU detected" when two ranks share a GPU
            {"resources": {"workers": 2, "gpu": 0.5}},
            "resources.gpu: a data-parallel trial (workers: 2) needs a whole GPU per worker",
        ),
        ({"resources": {"gpu": 1.5}}, "resources.gpu: a share above 1 must be a whole number of GPUs, got 1.5"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_field(changes, expected):
    with pytest.raises(SpecError) as err:
        _spec(**changes)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_missing_teacher_or_data_set_is_caught_before_ray(tmp_path, tiny_teacher):
    spec = _spec(teacher=str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="teacher: .*nope is not a checkpoint directory"):
        resolve_paths(spec, "s.yaml")
    with pytest.raises(SpecError, match=r"^s.yaml: data: .* is not a COCO-format data set"):
        resolve_paths(_spec(teacher=str(tiny_teacher), data=str(tmp_path)), "s.yaml")
    resolved = resolve_paths(_spec(teacher=str(tiny_teacher)), "s.yaml")
    assert resolved.data and resolved.teacher == str(tiny_teacher.resolve())


def test_config_paths_become_absolute_and_a_missing_one_is_refused(tmp_path, tiny_teacher, monkeypatch):
    """Trials run in their own directories: a relative train.init_from or model.backbone_weights is made
    absolute from where the sweep is launched, and one that is not there stops the sweep before Ray."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_teacher, tmp_path / "weights")  # a checkpoint to start from
    spec = resolve_paths(_spec(teacher=str(tiny_teacher), config={"train": {"init_from": "weights"}}), "s.yaml")
    assert spec.config["train"]["init_from"] == str((tmp_path / "weights").resolve())
    with pytest.raises(SpecError, match=r"^s.yaml: config.model.backbone_weights: nope not found"):
        resolve_paths(_spec(teacher=str(tiny_teacher), config={"model": {"backbone_weights": "nope"}}), "s.yaml")


def test_a_kitti_objective_needs_kitti_data(tmp_path, tiny_teacher):
    """A sweep may select on KITTI's own metric, on a validation split `data kitti` converted."""
    from test_data import make_kitti

    from clockdistill.data.kitti import convert_kitti

    kitti_objective = {"objective": {"metric": "kitti/Car/moderate", "mode": "max"}}
    with pytest.raises(SpecError, match=r"^s.yaml: objective: kitti/Car/moderate needs a validation split converted"):
        resolve_paths(_spec(teacher=str(tiny_teacher), **kitti_objective), "s.yaml")  # the synthetic data
    kitti = make_kitti(tmp_path / "kitti")
    convert_kitti(kitti, tmp_path / "coco", kitti / "train.txt", kitti / "val.txt")
    spec = resolve_paths(_spec(teacher=str(tiny_teacher), data=str(tmp_path / "coco"), **kitti_objective), "s.yaml")
    assert spec.primary.metric == "kitti/Car/moderate"
    assert S.checkpoint_score("kitti/Car/moderate", "max") == ("kitti/Car/moderate", "max")
    with pytest.raises(SpecError, match="objective.metric"):
        parse_spec({**BASE, "objective": {"metric": "kitti/Truck/moderate"}})


def test_spec_file_round_trip_and_name_override(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: a\nteacher: x\nepochs: 2\nsearch_space:\n  distill.memory.alpha: {loguniform: [1e-6, 1e-2]}\n"
        "  distill.logit.groups: {int: [1, 3]}\n"
    )
    spec = load_spec(path, name="b")
    assert spec.name == "b" and spec.search_space["distill.memory.alpha"].kind == "loguniform"
    again = spec_from_json(spec_to_json(spec))
    assert again == spec and json.loads(spec_to_json(spec))["search_space"]["distill.logit.groups"] == {"int": [1, 3]}
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")


def test_search_space_translates_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = tune_param_space(_spec())
    assert isinstance(space["distill.memory.alpha"], Float) and space["distill.memory.alpha"].lower == 1e-6
    assert isinstance(space["distill.logit.groups"], Integer) and (
        space["distill.logit.groups"].lower,
        space["distill.logit.groups"].upper,
    ) == (1, 4)
    assert isinstance(space["distill.logit.temperature"], Categorical) and space[
        "distill.logit.temperature"
    ].categories == [1, 2, 4, 10]
    assert space["distill.memory.beta"] == 1e-7
    samples = [space["distill.memory.alpha"].sample() for _ in range(200)]
    assert (
        all(1e-6 <= s <= 1e-2 for s in samples) and sum(s < 1e-4 for s in samples) > 60
    )  # log-uniform: half below the geometric mean
    grid = tune_param_space(
        _spec(search={"algorithm": "grid"}, search_space={"distill.method": {"grid": ["none", "clockdistill"]}})
    )
    assert grid["distill.method"] == {"grid_search": ["none", "clockdistill"]}


def test_paper_defaults_are_the_first_point_and_are_brought_into_the_space():
    point = paper_defaults_point(_spec())
    assert point == {
        "distill.memory.alpha": 5e-5,
        "distill.logit.groups": 3,
        "distill.logit.temperature": 10,
        "distill.logit.cls_weight": 1.0,
    }
    outside = _spec(
        search_space={
            "distill.memory.alpha": {"loguniform": [1e-3, 1e-2]},
            "distill.logit.temperature": {"choice": [1, 2]},
            "distill.logit.cls_form": {"choice": ["binary_kl"]},
        }
    )
    assert paper_defaults_point(outside) == {
        "distill.memory.alpha": 1e-3,
        "distill.logit.temperature": 2,
        "distill.logit.cls_form": "binary_kl",
    }
    # the spec's own config is the default where it sets a key
    own = _spec(
        config={"train": {"lr": 3e-4}},
        search_space={"train.lr": {"choice": [1e-5, 3e-4]}, "distill.memory.alpha": {"uniform": [1e-5, 1e-4]}},
    )
    assert paper_defaults_point(own) == {"train.lr": 3e-4, "distill.memory.alpha": 5e-5}


def test_a_default_outside_one_dimension_still_gives_optuna_a_complete_first_point():
    # a point naming only some keys made OptunaSearch refuse the whole sweep ("Dim of point ... do not match")
    spec = _spec(
        search_space={"train.lr": {"choice": [1e-5, 1e-3]}, "distill.memory.alpha": {"loguniform": [1e-5, 1e-3]}}
    )
    searcher = _optuna_searcher(spec)
    assert searcher.suggest("t1") == {"train.lr": 1e-5, "distill.memory.alpha": 5e-5}


def _optuna_searcher(spec):
    searcher = build_searcher(spec)
    searcher.set_search_properties(None, None, tune_param_space(spec))
    return searcher


def test_scheduler_stopped_trials_reach_optuna_as_pruned_and_diverged_as_failed():
    from optuna.trial import TrialState

    spec = _spec()
    searcher = _optuna_searcher(spec)
    first = searcher.suggest("t1")
    assert first["distill.memory.alpha"] == 5e-5 and first["distill.logit.temperature"] == 10  # the paper defaults
    for tid in ("t2", "t3", "t4"):
        searcher.suggest(tid)
    for epoch in (1, 2, 3):
        searcher.on_trial_result("t1", {"best_AP": 0.1 * epoch, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete("t1", {"best_AP": 0.3, "epoch": 3})  # full budget
    searcher.on_trial_result("t2", {"best_AP": 0.05, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete("t2", {"best_AP": 0.05, "epoch": 1})  # stopped by ASHA after one epoch
    searcher.on_trial_complete("t3", {"best_AP": 0.0, "epoch": 1, "diverged": 1})
    searcher.on_trial_complete("t4", None, error=True)
    states = [t.state for t in searcher._ot_study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL]
    assert searcher._ot_study.best_value == pytest.approx(0.3)


def test_the_baseline_trial_comes_first_and_optuna_never_sees_it():
    spec = _spec(baseline_trial=True)
    searcher = _optuna_searcher(spec)
    baseline = searcher.suggest("b")
    assert baseline["baseline"] is True and baseline["distill.method"] == "none"
    assert baseline["distill.memory.alpha"] == 5e-5  # every searched key named, at its first point
    first = searcher.suggest("p")
    assert first["distill.logit.temperature"] == 10 and "distill.method" not in first  # then the paper defaults
    for tid, ap in (("b", 0.9), ("p", 0.2)):
        searcher.on_trial_result(tid, {"best_AP": ap, "epoch": 3, "training_iteration": 3})
        searcher.on_trial_complete(tid, {"best_AP": ap, "epoch": 3})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.values for t in trials] == [[0.2]]  # the baseline's 0.9 taught Optuna nothing
    # saved with the searcher: a resumed sweep does not add a second baseline
    searcher.save(str(__import__("tempfile").mkdtemp()) + "/s.pkl")
    assert searcher.suggest("q").get("baseline") is None


def test_asha_never_stops_the_baseline_and_stops_an_equal_trial():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    spec = _spec(baseline_trial=True, epochs=4, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    asha = build_scheduler(spec)
    good = [Trial("t", config={"distill.memory.alpha": 1e-3}, stub=True) for _ in range(3)]
    baseline = Trial("t", config={"baseline": True, "distill.method": "none"}, stub=True)
    worse = Trial("t", config={"distill.memory.alpha": 1e-1}, stub=True)
    for trial in (*good, baseline, worse):
        asha.on_trial_add(None, trial)
    decisions = {}
    for trial, ap in ((good[0], 0.5), (good[1], 0.6), (good[2], 0.7), (baseline, 0.01), (worse, 0.01)):
        decisions[trial.trial_id] = asha.on_trial_result(None, trial, {"training_iteration": 1, "best_AP": ap})
    assert decisions[baseline.trial_id] == TrialScheduler.CONTINUE
    assert decisions[worse.trial_id] == TrialScheduler.STOP  # the same result stops a distilled trial
    asha.on_trial_complete(None, baseline, {"training_iteration": 4, "best_AP": 0.01})
    assert baseline.trial_id not in asha._trial_info


def test_trial_labels_name_the_number_and_the_knobs():
    from sweeps.tracking.schema import trial_label, trial_number

    assert trial_number("3_distill.memory.alpha=0.0050") == 3
    assert trial_number("train_trial_8870a1b2_12_distill_logit=1_2026-11-30_03-31-25") == 12
    assert trial_number("0_train.lr=0.0004", "949df_00000") == 1  # grid: Tune's variant generator counts from 0
    assert trial_number("train_trial_949df_00002_2_train_lr=0.0004_2026-11-30", "949df_00002") == 3
    assert trial_number("8870a1b2") is None
    knobs = {"distill.memory.alpha": 5e-3, "distill.logit.temperature": 2, "distill.logit.weight": 0.3912}
    assert trial_label(3, "x", knobs) == "t03 alpha=5.0e-3 T=2 w=0.39"
    assert trial_label(1, "x", {"baseline": True, "distill.method": "none"}) == "t01 no-KD baseline"
    assert trial_label(None, "8870a1b2", {"train.lr": 2e-4, "distill.logit.groups": 3}) == "8870a1b2 lr=2.0e-4 groups=3"


def test_multi_objective_searcher_and_asha_on_the_first_objective():
    spec = _spec(objectives=[{"metric": "AP", "mode": "max"}, {"metric": "params", "mode": "min"}])
    searcher = _optuna_searcher(spec)
    assert searcher.metric == ["best_AP", "best_params"] and searcher.mode == ["max", "min"]
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"best_AP": 0.2, "best_params": 1e5, "epoch": 3})
    assert searcher._ot_study.get_trials()[0].values == [0.2, 1e5]
    scheduler = build_scheduler(spec)
    assert scheduler.metric == "best_AP" and scheduler._max_t == 3


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (__import__("pathlib").Path(__file__).parents[1] / "sweeps" / "configs").glob("*.yaml")),
)
def test_shipped_specs_are_valid(path):
    from sweeps.study import load_study, method_spec

    if "methods:" in __import__("pathlib").Path(path).read_text():  # a study: a sweep spec per method
        base, methods, _ = load_study(path)
        specs = [method_spec(base, m, space, path) for m, space in methods.items()]
        assert len({(s.epochs, s.num_samples, s.search.algorithm, s.scheduler.type) for s in specs}) == 1
        assert all(s.search_space and s.config["distill"]["method"] == m for s, m in zip(specs, methods))
        return
    spec = load_spec(path)
    assert spec.search_space and spec.epochs >= 1


@pytest.mark.slow
def test_demo_prints_teacher_student_alone_and_best_distilled_student(tmp_path):
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "clockdistill", "demo", "--workdir", str(tmp_path / "demo")]
        + ["--train", "16", "--val", "8", "--test", "12", "--trials", "1", "--sweep-epochs", "1"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    # the shipped teacher, the no-KD trial on the same budget, and the three-row table
    assert "teacher: the shipped hybrid-tiny-teacher" in proc.stderr
    assert "sweep demo: 2 trials, 2 ran the full budget" in out and "t01 started   no-KD baseline" in out
    table = out[out.rindex("\nmodel ") + 1 :].splitlines()
    assert table[1].startswith("teacher (hybrid-tiny-teacher)")
    assert table[2].startswith("student alone (t01, no KD)") and "x smaller" in table[2]
    assert table[3].startswith("best distilled student (t02)") and "x faster" in table[3]
    # every row's held-out test AP with its interval, and what distillation did there, with its interval
    intervals = [re.search(r" (\d\.\d{4}) \[(\d\.\d{4}), (\d\.\d{4})\] ", row) for row in table[1:4]]
    assert all(m and float(m[2]) <= float(m[1]) <= float(m[3]) for m in intervals), table
    assert re.search(r"(gained|lost|changed AP by) [+-]\d+\.\d\d AP \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", table[4]), table
    assert "held-out test images" in table[4]
    export = json.loads((tmp_path / "demo" / "best-student" / "export.json").read_text())
    assert export["test"]["images"] == 12 and set(export["test"]["models"]) == {"winner", "alone", "teacher"}
    assert "## Held-out test split\n12 images" in (tmp_path / "demo" / "best-student" / "MODEL_CARD.md").read_text()
    # the demo ends with the report and the exported, registered best student (never the baseline)
    assert (tmp_path / "demo" / "report" / "ap_over_epochs.png").is_file()
    assert (tmp_path / "demo" / "best-student" / "student.torchscript.pt").is_file()
    assert "alias champion -> clockdistill-demo-student version 1" in out
    assert export["method"] == "clockdistill"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("clockdistill-demo").experiment_id])
    baseline = [r for r in runs if r.data.tags.get(S.BASELINE_TAG) == "true"]
    assert [(r.info.run_name, r.data.params["distill.method"]) for r in baseline] == [("t01 no-KD baseline", "none")]
    assert "demo" in {r.info.run_name for r in runs if r.data.tags.get(S.ROLE_TAG) == "sweep"}
    winner = next(r for r in runs if r.data.tags.get(S.TRIAL_ID_TAG) == export["trial_id"])
    assert winner.data.metrics["test_AP"] == pytest.approx(export["test"]["models"]["winner"]["AP"])
    version = client.get_model_version_by_alias("clockdistill-demo-student", "champion")
    assert float(version.tags["selection_minus_test_AP"]) == pytest.approx(export["test"]["selection_gap"], abs=1e-6)


def test_pbt_mutates_the_searched_keys_and_grid_uses_tune_variants():
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    spec = _spec(search={"algorithm": "random"}, scheduler={"type": "pbt", "perturbation_interval": 1})
    scheduler = build_scheduler(spec)
    assert isinstance(scheduler, PopulationBasedTraining)
    assert set(scheduler._hyperparam_mutations) == {
        "distill.memory.alpha",
        "distill.logit.groups",
        "distill.logit.temperature",
        "distill.logit.cls_weight",
    }
    assert isinstance(build_searcher(spec), BasicVariantGenerator)
    grid = _spec(search={"algorithm": "grid"}, search_space={"distill.method": {"grid": ["none", "clockdistill"]}})
    assert isinstance(build_searcher(grid), BasicVariantGenerator)


def test_variants_bundle_config_keys_into_one_searched_name(tiny_teacher):
    from sweeps.tracking.schema import trial_label
    from sweeps.tune.trial import trial_config, trial_params

    spec = _spec(
        teacher=str(tiny_teacher),
        variants={
            "clock-paper": {"distill.method": "clockdistill"},
            "clock-tuned": {
                "distill.method": "clockdistill",
                "distill.memory.alpha": 0.085,
                "distill.logit.temperature": 1,
            },
            "alone": {"distill.method": "none"},
        },
        search={"algorithm": "grid"},
        search_space={"variant": {"grid": ["alone", "clock-paper", "clock-tuned"]}, "train.seed": {"grid": [0, 1]}},
    )
    assert tune_param_space(spec)["variant"] == {"grid_search": ["alone", "clock-paper", "clock-tuned"]}
    tuned = trial_config(spec, {"variant": "clock-tuned", "train.seed": 1}, "out")
    assert (tuned.distill.method, tuned.distill.memory.alpha, tuned.distill.logit.temperature) == (
        "clockdistill",
        0.085,
        1,
    )
    paper = trial_config(spec, {"variant": "clock-paper", "train.seed": 1}, "out")
    assert paper.distill.memory.alpha == 5e-5 and paper.train.seed == 1
    params = trial_params(tuned, "clock-tuned")
    assert params["variant"] == "clock-tuned" and params["distill.memory.alpha"] == 0.085
    assert params["train.seed"] == 1 and "train.output_dir" not in params
    assert trial_label(4, "x", {"variant": "clock-tuned", "train.seed": 0}) == "t04 variant=clock-tuned seed=0"


def test_a_trial_given_a_gpu_trains_on_cuda_or_fails_in_one_line(tiny_teacher):
    """train.device auto in a trial with resources.gpu > 0 is cuda: on a node where CUDA is missing the
    trial fails saying so instead of training on the CPU while holding its GPU share."""
    from clockdistill.engine import select_device
    from clockdistill.errors import UserError
    from sweeps.tune.trial import trial_config

    space = {"train.lr": {"uniform": [1e-4, 1e-3]}}
    on_gpu = trial_config(_spec(teacher=str(tiny_teacher), resources={"gpu": 0.5}, search_space=space), {}, "out")
    on_cpu = trial_config(_spec(teacher=str(tiny_teacher), search_space=space), {}, "out")
    assert on_gpu.train.device == "cuda" and on_cpu.train.device == "auto"
    named = {"train": {"device": "cpu"}}
    pinned = _spec(teacher=str(tiny_teacher), resources={"gpu": 1}, search_space=space, config=named)
    assert trial_config(pinned, {}, "out").train.device == "cpu"  # a device the spec names is kept
    if not __import__("torch").cuda.is_available():
        with pytest.raises(UserError, match="^train.device: cuda requested but CUDA is not available"):
            select_device(on_gpu.train.device)
