"""A real browser on the real MLflow UI: `make mlflow-ui` on the tiny sweep's store, headless
Chromium opens the experiment and the sweep run, and must show the trial runs and the report.
Screenshots are kept in test-artifacts/ (or $TEST_ARTIFACTS_DIR)."""

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cdp import Browser, find_or_install_chromium, free_port

from conftest import run_cli
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def chromium():
    binary, why = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"no headless browser: {why}")
    return binary


@pytest.fixture(scope="module")
def mlflow_ui(tiny_sweep, tmp_path_factory):
    """`make mlflow-ui` on the tiny sweep's SQLite store, on a free port, with a new accounts file;
    yields its base URL and the accounts file."""
    port = free_port()
    db = tiny_sweep["tracking_uri"][len("sqlite:///") :]
    accounts = tmp_path_factory.mktemp("mlflow-ui") / "accounts.yaml"
    proc = subprocess.Popen(
        ["make", "-s", "mlflow-ui", f"MLFLOW_DB={db}", f"MLFLOW_PORT={port}", f"MLFLOW_ACCOUNTS={accounts}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    # up once it says so: after /health answers it still creates the accounts
    output, deadline = [], time.monotonic() + 300  # generous: a busy 2-core machine starts it slowly
    while not any(line.startswith(b"MLflow at") for line in output):
        line = proc.stdout.readline()
        if not line and (proc.poll() is not None or time.monotonic() > deadline):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"make mlflow-ui did not come up: {b''.join(output).decode()[-2000:]}")
        output.append(line)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # (a full pipe would stall the server)
    yield url, accounts
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_mlflow_ui_shows_the_trials_and_the_report(tiny_sweep, mlflow_ui, chromium, tmp_path):
    """A read-only account of the server's accounts file browses the sweep (MLflow asks every request
    for an account: the browser sends the reader's credentials)."""
    import base64

    import yaml
    from mlflow.tracking import MlflowClient

    mlflow_ui, accounts = mlflow_ui
    reader = yaml.safe_load(accounts.read_text())["readers"][0]
    with pytest.raises(urllib.error.HTTPError, match="401"):  # no account: refused
        urllib.request.urlopen(f"{mlflow_ui}/ajax-api/2.0/mlflow/experiments/search?max_results=1", timeout=10)

    proc = run_cli("report", "--tracking-uri", tiny_sweep["tracking_uri"], "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(tiny_sweep["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    parent = client.search_runs([exp.experiment_id], S.sweep_filter("tiny"))[0]
    trial_names = [r.info.run_name for r in client.search_runs([exp.experiment_id], S.trial_filter("tiny"))]
    every_run = client.search_runs([exp.experiment_id])  # (with a confirmation stage's, when a test ran one)
    assert trial_names
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = Browser(chromium, tmp_path / "profile")
    try:
        token = base64.b64encode(f"{reader['username']}:{reader['password']}".encode()).decode()
        browser.call("Network.enable")
        browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
        browser.goto(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs")
        browser.wait_for_text("tiny", "matching runs")
        # trial runs are nested under the sweep's run: open it
        browser.click('button[data-component-id*="runnamecellrenderer"]')
        text = browser.wait_for_text(*trial_names)
        assert f"{len(every_run)} matching runs" in text
        browser.screenshot(ARTIFACTS / "mlflow-ui-trials.png")

        # the sweep run's artifacts, opened on one report plot (its folder unfolds with it)
        browser.goto(
            f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/report/ap_over_epochs.png"
        )
        browser.wait_for_text(
            "report",
            "spec.json",
            "ap_over_epochs.png",
            "ap_vs_knobs.png",
            "param_importance.png",
            "samples.png",
            "trials.parquet",
        )
        shown = "(document.querySelector('img[alt=\"report/ap_over_epochs.png\"]') || {}).naturalWidth || 0"
        deadline = time.monotonic() + 30
        while not browser.evaluate(shown) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert browser.evaluate(shown) > 200, "the report plot did not render in the artifact viewer"
        shot = browser.screenshot(ARTIFACTS / "mlflow-ui-report.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 20_000
