"""What a sweep shows a person: one line per trial event on the console (Ray's own tables and
warnings only with --verbose) and MLflow trial runs named by their number and knobs."""

import re

from sweeps.tracking import schema as S
from sweeps.tracking.schema import KNOB_SHORT

RAY_NOISE = ("╭", "│", "+----", "Trial status", "Configuration for experiment", "snapshotting", " -- ", "pid=")


def test_a_quiet_sweep_prints_trial_events_and_nothing_of_rays(tiny_sweep):
    out = tiny_sweep["stdout"]
    for noise in RAY_NOISE:
        assert noise not in out, noise
    started = re.findall(r"^(t\d\d) started   lr=\S+ T=\d+$", out, re.M)
    assert sorted(started) == ["t01", "t02", "t03", "t04"], out[-3000:]
    assert re.search(r"^t0\d epoch 1/2  AP \d\.\d{4} \(best \d\.\d{4}\)$", out, re.M)
    ends = re.findall(r"^(t\d\d) (finished|stopped early)", out, re.M)
    assert sorted(n for n, _ in ends) == ["t01", "t02", "t03", "t04"]
    assert re.search(
        r"^    \[4/4 trials done: \d finished, \d stopped early, 0 failed; 0 running; best so far", out, re.M
    )


def test_mlflow_trial_runs_are_named_by_number_and_knobs(tiny_sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_sweep["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], S.trial_filter("tiny"))  # (not a confirmation stage's)
    assert sorted(r.info.run_name.split(" ")[0] for r in runs) == ["t01", "t02", "t03", "t04"]
    short_to_key = {v: k for k, v in KNOB_SHORT.items()}
    for run in runs:
        knobs = dict(part.split("=") for part in run.info.run_name.split(" ")[1:])
        assert set(knobs) == {"lr", "T"}, run.info.run_name
        for short, shown in knobs.items():
            value = float(run.data.params[short_to_key[short]])
            assert abs(float(shown) - value) <= 0.05 * abs(value), (run.info.run_name, value)
    parent = client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_SWEEP))
    assert [r.info.run_name for r in parent] == ["tiny"]
