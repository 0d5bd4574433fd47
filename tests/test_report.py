"""`clockdistill report` on a real finished sweep: the Parquet table and the plots, logged to MLflow."""

import json
from pathlib import Path

import pytest

from conftest import run_cli, tune_results
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _valid_png(path: Path) -> bool:
    from PIL import Image

    if not path.is_file() or path.read_bytes()[:8] != PNG_SIGNATURE:
        return False
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size[0] > 200 and im.size[1] > 100


@pytest.fixture(scope="module")
def report(tiny_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = run_cli("report", "--tracking-uri", tiny_sweep["tracking_uri"], "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc


def test_parquet_table_has_one_row_per_trial_with_its_epochs(tiny_sweep, report):
    import pyarrow.parquet as pq

    out, _ = report
    table = pq.read_table(out / "trials.parquet").to_pylist()
    tune_rows = tune_results(tiny_sweep["storage"], "tiny")
    assert sorted(r["trial_id"] for r in table) == sorted(tune_rows)
    columns = set(table[0])
    assert {
        "trial_id",
        "run_id",
        "status",
        "completed_full_budget",
        "epochs_run",
        "best_AP",
        "param.train.lr",
        "param.distill.logit.temperature",
        "config",
        "epoch",
        "metric.AP",
        "metric.loss",
    } <= columns
    for row in table:
        lines = tune_rows[row["trial_id"]]
        assert row["epoch"] == [r["epoch"] for r in lines]
        assert row["metric.AP"] == pytest.approx([r["AP"] for r in lines])
        assert row["completed_full_budget"] == bool(lines[-1]["completed_full_budget"])
        assert row["param.train.lr"] == pytest.approx(lines[-1]["config"]["train.lr"])
        assert json.loads(row["config"])["distill.method"] == "clockdistill"


def test_every_plot_is_a_valid_png_and_everything_is_on_the_sweep_run(tiny_sweep, report):
    from mlflow.tracking import MlflowClient

    out, proc = report
    expected = ["ap_over_epochs.png", "ap_vs_knobs.png", "param_importance.png", "samples.png"]
    for name in expected:
        assert _valid_png(out / name), name
    assert not (out / "pareto_front.png").exists()  # a single-objective sweep
    client = MlflowClient(tiny_sweep["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the training runs
    parent = client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_SWEEP))[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert set(expected) | {"trials.parquet"} <= logged
    assert "logged to MLflow run" in proc.stdout


def test_pareto_front_plot_for_two_objectives(tmp_path):
    from sweeps.results.plots import pareto_front

    rows = [
        {"trial_id": t, "best": {"AP": ap, "latency_ms": ms}}
        for t, ap, ms in (("a", 0.4, 5.0), ("b", 0.7, 20.0), ("c", 0.39, 6.0), ("d", 0.6, 10.0))
    ]
    path = pareto_front(rows, [("AP", "max"), ("latency_ms", "min")], {"a", "b", "d"}, tmp_path / "pareto.png")
    assert _valid_png(path)


def test_report_errors_are_one_line(tmp_path):
    proc = run_cli("report", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert (
        proc.returncode == 2
        and proc.stderr.strip().startswith("error: no MLflow store at")
        and len(proc.stderr.strip().splitlines()) == 1
    )
