"""The efficacy-study page: per-method statistics over seeds and paired differences with 95% t
intervals, checked against hand-computed values (t quantile from a printed table), and its plot."""

import math

import pytest

from sweeps.results.study import compare_methods, format_table, method_comparison_plot


def _row(method, seed, ap, full=True):
    return {
        "config": {"distill.method": method, "train.seed": seed},
        "completed_full_budget": full,
        "best": {"AP": ap, "AP50": ap + 0.2},
    }


ROWS = [
    *(_row("none", s, ap) for s, ap in ((0, 0.10), (1, 0.12), (2, 0.11))),
    *(_row("vanilla_kd", s, ap) for s, ap in ((0, 0.12), (1, 0.15), (2, 0.15))),
    *(_row("fitnet", s, ap) for s, ap in ((0, 0.11), (1, 0.12), (2, 0.10))),
    *(_row("clockdistill", s, ap) for s, ap in ((0, 0.13), (1, 0.16), (2, 0.17))),
    _row("clockdistill", 3, 0.50),  # no partner seed in the others: left out of every pair
    _row("detrdistill", 0, 0.90, full=False),  # stopped early: not counted at all
]


def test_paired_differences_and_their_95_percent_intervals():
    study = compare_methods(ROWS)
    assert set(study["methods"]) == {"none", "vanilla_kd", "fitnet", "clockdistill"}
    clock = study["methods"]["clockdistill"]["AP"]
    assert clock["n"] == 4 and clock["mean"] == pytest.approx((0.13 + 0.16 + 0.17 + 0.50) / 4)
    d = study["versus_alone"]["clockdistill"]  # seeds 0-2: 0.03, 0.04, 0.06
    t975_2 = 4.303  # Student's t, 2 degrees of freedom, two-sided 95% (printed tables)
    half = t975_2 * 0.015275252 / math.sqrt(3)  # sd of (0.03, 0.04, 0.06)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.043333, abs=1e-6)
    assert d["low"] == pytest.approx(0.043333 - half, abs=2e-4) and d["high"] == pytest.approx(
        0.043333 + half, abs=2e-4
    )
    assert study["best_baseline"] == "vanilla_kd"  # 0.140 against fitnet's 0.110
    vb = study["versus_best_baseline"]["clockdistill"]  # 0.01, 0.01, 0.02
    assert vb["mean"] == pytest.approx(0.013333, abs=1e-6) and vb["low"] < vb["mean"] < vb["high"]
    assert "vanilla_kd" not in study["versus_best_baseline"]
    assert study["methods"]["none"]["AP50"]["mean"] == pytest.approx(0.31)
    table = format_table(study)
    assert table.splitlines()[1].startswith("clockdistill") and "best baseline: vanilla_kd" in table


def test_a_single_seed_gives_a_difference_without_an_interval(tmp_path):
    study = compare_methods([_row("none", 0, 0.1), _row("clockdistill", 0, 0.2)])
    d = study["versus_alone"]["clockdistill"]
    assert d["n"] == 1 and d["low"] is None and d["mean"] == pytest.approx(0.1)
    assert study["best_baseline"] is None and "n=1" in format_table(study)
    path = method_comparison_plot(compare_methods(ROWS), tmp_path / "methods.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_optimum_estimators_on_known_curves():
    from sweeps.results.study import half_rise, parabola_peak

    xs = [-1.0, 0.0, 1.0, 2.0, 3.0]
    # y = 5 - (x - 0.8)^2 sampled on the grid: the vertex is found exactly, not the best grid point (1.0)
    assert parabola_peak(xs, [5 - (x - 0.8) ** 2 for x in xs]) == pytest.approx(0.8)
    # best point at an end of the grid, or a parabola opening upwards: the grid point itself
    assert parabola_peak(xs, [1, 2, 3, 4, 5]) == 3.0
    assert parabola_peak([0.0, 1.0, 2.0], [1.0, 1.5, 3.0]) == 2.0
    # the half of the maximum (4) is crossed between x=-1 (y=1) and x=0 (y=7): at x = -0.5
    assert half_rise(xs, [1, 7, 8, 6, 2]) == pytest.approx(-0.5)
    assert half_rise(xs, [5, 7, 8, 6, 2]) == -1.0  # already above half at the first point


# -- the fair study end to end (clockdistill study) ------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return path


def test_a_study_spec_is_refused_in_one_line_where_it_is_wrong(tmp_path):
    from clockdistill.errors import UserError
    from sweeps.study import load_study

    head = "name: s\nteacher: t\nepochs: 1\n"
    good = "methods:\n  none: {train.lr: {loguniform: [1.0e-4, 1.0e-3]}}\n"
    cases = {
        "no_none": (head + "methods:\n  fitnet: {distill.memory.fitnet_weight: {grid: [1]}}\n", "methods: the study"),
        "unknown": (head + good + "  kd_magic: {distill.logit.weight: {grid: [1]}}\n", "methods.kd_magic: not a"),
        "empty": (head + good + "  fitnet: {}\n", "methods.fitnet: expected its search space"),
        "shared_space": (head + good + "search_space: {train.lr: {grid: [1]}}\n", "search_space: a study"),
        "one_seed": (head + good + "confirm_seeds: 1\n", "confirm_seeds: expected an integer >= 2"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_study(_write(tmp_path / f"{name}.yaml", text))
        assert "\n" not in str(err.value)
    base, methods, seeds = load_study(_write(tmp_path / "ok.yaml", head + good))
    assert "methods" not in base and list(methods) == ["none"] and seeds == 5


def test_a_study_tunes_every_method_alike_confirms_its_best_on_new_seeds_and_tests_them(tiny_sweep, tmp_path):
    """Two methods x 2 TPE trials of 1 epoch; each method's best trial (validation) on 2 new seeds;
    the confirmation runs' test AP as the page reports it equals `clockdistill evaluate --split test`."""
    import json
    import subprocess
    import sys

    from conftest import clean_env, tune_results

    storage = tmp_path / "storage"
    spaces = {"none": {"train.lr": [1.0e-5, 2.0e-3]}, "clockdistill": {"distill.logit.weight": [0.25, 4.0]}}
    methods = "".join(f"  {m}: {{{k}: {{loguniform: {v}}}}}\n" for m, s in spaces.items() for k, v in s.items())
    spec = _write(
        tmp_path / "fair.yaml",
        f"name: fair\nteacher: {tiny_sweep['teacher']}\nstudent: hybrid-tiny-teacher\nepochs: 1\n"
        "config:\n  train: {batch_size: 6, weight_decay: 0.0, warmup_iters: 0, clip_max_norm: 1.0}\n"
        "  distill: {init_student: true, teacher_cache: 'on'}\n"
        f"  data: {{pad_to: max_size, decoded_cache: true, cache_dir: '{tiny_sweep['root'] / 'cache'}'}}\n"
        f"methods:\n{methods}confirm_seeds: 2\nsearch: {{algorithm: tpe, seed: 0}}\nscheduler: {{type: none}}\n"
        f"num_samples: 2\nmax_concurrent_trials: 1\nresources: {{cpu: 1}}\nstorage_path: {storage}\n"
        f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'mlflow.db'}', experiment: fair}}\n",
    )
    out = tmp_path / "page"
    proc = subprocess.run(
        [sys.executable, "-m", "clockdistill", "study", str(spec), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    page = json.loads((out / "study.json").read_text())
    for method, space in spaces.items():  # the same budget for each, over the method's own knobs
        trials = tune_results(storage, f"fair-{method}")
        assert len(trials) == 2
        top = max(rows[-1]["best_AP"] for rows in trials.values())
        for rows in trials.values():
            config = json.loads(rows[0]["trial_config"])
            assert config["distill.method"] == method and len(rows) == 1 and rows[-1]["completed_full_budget"]
            assert all(config[k] != 0 for k in space)
        best = [json.loads(rows[0]["trial_config"]) for rows in trials.values() if rows[-1]["best_AP"] == top]
        # the best on validation (one of them, on a tie) is the one confirmed
        assert any(page["chosen"][method]["setting"] == pytest.approx({k: c[k] for k in space}) for c in best)
    confirm = tune_results(storage, "fair-confirm2")
    runs = {}
    for rows in confirm.values():
        config = json.loads(rows[0]["trial_config"])
        method, seed = config["distill.method"], config["train.seed"]
        assert {k: config[k] for k in spaces[method]} == pytest.approx(page["chosen"][method]["setting"])
        runs[(method, seed)] = rows[0]["trial_id"]
    assert set(runs) == {(m, s) for m in spaces for s in (1, 2)}
    values = {m: page["methods"][m]["AP"]["values"] for m in spaces}
    diffs = [values["clockdistill"][s] - values["none"][s] for s in ("1", "2")]
    assert page["versus_alone"]["clockdistill"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert set(page["winners_curse"]["none"]) == {"chosen", "random"}
    trial_dir = next(storage.glob(f"fair-confirm2/train_trial_{runs[('clockdistill', 2)]}_*"))
    evaluated = subprocess.run(
        [sys.executable, "-m", "clockdistill", "evaluate", "--checkpoint", str(next(trial_dir.glob("checkpoint_*"))),
         "--data", str(tiny_sweep["data"]), "--split", "test", "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["AP"] == pytest.approx(values["clockdistill"]["2"], abs=1e-6)
    assert "vs alone" in proc.stdout and (out / "method_comparison.png").stat().st_size > 5000
