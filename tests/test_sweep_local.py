"""A grid sweep on an in-process local Ray: a diverging trial ends FAILED with its reason, the other
finishes, and the sweep itself succeeds (its two trials sharing the teacher through the sweep's
exchange)."""

import pytest

from conftest import run_sweep_cli
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow


def test_a_diverging_trial_fails_alone_and_the_sweep_goes_on(tiny_teacher, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        f"name: grid\nteacher: {tiny_teacher}\nepochs: 1\nconfig:\n  train: "
        f"{{batch_size: 8, clip_max_norm: 0.0, warmup_iters: 0}}\n  distill: {{teacher_share: node}}\n"
        "search_space:\n  train.lr: {grid: [4.0e-4, 1.0e+8]}\n"
        "search: {algorithm: grid}\nscheduler: {type: none}\nnum_samples: 1\nmax_concurrent_trials: 2\nmax_failures: "
        "2\n"
        f"resources: {{cpu: 1}}\nstorage_path: {tmp_path / 'storage'}\nmlflow: "
        f"{{tracking_uri: 'sqlite:///{db}', experiment: grid}}\n"
    )
    proc = run_sweep_cli(spec, tmp_path, "--verbose")
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("grid")
    runs = {r.data.params["train.lr"]: r for r in client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_TRIAL))}
    assert set(runs) == {"0.0004", "100000000.0"}
    good, bad = runs["0.0004"], runs["100000000.0"]
    assert good.info.status == "FINISHED" and good.data.tags[S.FULL_BUDGET_TAG] == "true"
    assert bad.info.status == "FAILED" and bad.data.tags[S.FULL_BUDGET_TAG] == "false"
    reason = bad.data.tags[S.FAILURE_REASON_TAG]
    assert "not finite" in reason or "loss is" in reason, reason
    assert "t02 failed after 0/1 epoch(s): " in proc.stdout or "t02 failed after 1/1 epoch(s): " in proc.stdout
    # --verbose: Ray's own console output too (its experiment table), besides the sweep's lines
    assert "Configuration for experiment" in proc.stdout and "t01 started   lr=4.0e-4" in proc.stdout
    # the exchange ran: the driver started it and said what it saved, the trial logged its share
    logs = proc.stdout + proc.stderr
    assert "teacher exchange: trials on one node" in logs and "teacher outputs computed" in logs
    shared = client.get_metric_history(good.info.run_id, "teacher_shared")
    assert len(shared) == 1 and 0.0 <= shared[0].value <= 1.0
    # Not retried: a divergence is deterministic (one trial directory, one attempt).
    assert len(list((tmp_path / "storage" / "grid").glob("train_trial_*"))) == 2
