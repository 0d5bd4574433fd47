"""`clockdistill sync`: a sweep's results written from its storage into an MLflow store that lacks them."""

import json

import pytest

from conftest import run_cli
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow


def test_sync_rebuilds_the_sweep_in_an_empty_store_and_best_student_works_on_it(tiny_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    original = MlflowClient(tiny_sweep["tracking_uri"])
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_sweep["spec"].read_text().replace(tiny_sweep["tracking_uri"], target))
    proc = run_cli("sync", str(spec))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sync tiny: 4 trials, " in proc.stdout

    def trials(client):
        exp = client.get_experiment_by_name("tiny")
        return {r.data.tags[S.TRIAL_ID_TAG]: r for r in client.search_runs([exp.experiment_id], S.trial_filter("tiny"))}

    before, after = trials(original), trials(MlflowClient(target))
    assert set(after) == set(before)
    for trial_id, run in after.items():
        old = before[trial_id]
        assert run.data.tags[S.FULL_BUDGET_TAG] == old.data.tags[S.FULL_BUDGET_TAG]
        assert run.data.params == old.data.params  # the full config the trial built, and its searched knobs
        ap = {m.step: m.value for m in MlflowClient(target).get_metric_history(run.info.run_id, "AP")}
        assert ap == {m.step: m.value for m in original.get_metric_history(old.info.run_id, "AP")}
        if old.data.tags[S.FULL_BUDGET_TAG] == "true":
            assert run.info.status == "FINISHED"
    # a second sync writes nothing new
    again = run_cli("sync", str(spec))
    assert again.returncode == 0 and ", 0 epoch(s) written, 0 run(s) closed" in again.stdout, again.stdout
    # and the synced store is enough for best-student (checkpoint path and hash come from the storage)
    out = tmp_path / "export"
    proc = run_cli("best-student", "--tracking-uri", target, "--out", str(out), "--no-register")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "export.json").read_text())["trial_id"] == tiny_sweep["summary"]["best"]["trial_id"]
