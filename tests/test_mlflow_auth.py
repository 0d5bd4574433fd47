"""Accounts on the tracking server (sweeps/tracking/accounts.py, `clockdistill mlflow-server`), against a
real MLflow server with its basic-auth app: who may read, log, register and move the champion alias,
one-line refusals, and no password in any file the server or its users write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cdp import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    port = free_port()
    accounts = work / "secrets" / "accounts.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clockdistill", "mlflow-server", "--accounts", str(accounts), "--new"]
        + ["--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--state", str(work / "state")]
        + ["--port", str(port)],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")},
    )
    output, deadline = [], time.monotonic() + 300  # a busy 2-core machine starts MLflow slowly
    while not any(line.startswith("MLflow at") for line in output):
        line = proc.stdout.readline()
        if not line and (proc.poll() is not None or time.monotonic() > deadline):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the server did not come up: " + "".join(output)[-2000:])
        output.append(line)
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.append(proc.stdout.read()), daemon=True)  # (a full pipe stalls it)
    drain.start()
    yield {
        "url": f"http://127.0.0.1:{port}",
        "accounts": yaml.safe_load(accounts.read_text()),
        "work": work,
        "output": output,
    }
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    drain.join(timeout=30)
    (work / "server-output.txt").write_text("".join(output + rest))


def _client(server, monkeypatch, who: str | None):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    if who is not None:
        account = server["accounts"][who] if who != "reader" else server["accounts"]["readers"][0]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", account["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", account["password"])
    return MlflowClient(server["url"])


def test_accounts_read_log_register_and_move_the_alias_as_their_role_allows(server, monkeypatch):
    from mlflow.exceptions import MlflowException

    from sweeps.tracking.accounts import refusal

    with pytest.raises(MlflowException) as anonymous:
        _client(server, monkeypatch, None).search_experiments()
    assert anonymous.value.error_code == "UNAUTHENTICATED"
    assert "refused no credentials (401" in refusal(anonymous.value)

    sweep = _client(server, monkeypatch, "sweep")  # the sweep account: runs, models, the alias
    experiment = sweep.create_experiment("kd-sweep")
    run = sweep.create_run(experiment)
    sweep.log_metric(run.info.run_id, "AP", 0.25)
    sweep.create_registered_model("student")
    version = sweep.create_model_version("student", f"runs:/{run.info.run_id}/student", run.info.run_id)
    sweep.set_registered_model_alias("student", "champion", version.version)

    reader = _client(server, monkeypatch, "reader")  # reads everything, writes to none of it
    assert reader.get_run(run.info.run_id).data.metrics["AP"] == 0.25
    assert reader.get_model_version_by_alias("student", "champion").version == version.version
    writes = {
        "log": lambda: reader.log_metric(run.info.run_id, "AP", 0.9),
        "register": lambda: reader.create_model_version("student", f"runs:/{run.info.run_id}/x", run.info.run_id),
        "alias": lambda: reader.set_registered_model_alias("student", "champion", version.version),
        "tag": lambda: reader.set_model_version_tag("student", version.version, "champion.set_by", "me"),
    }
    for name, write in writes.items():
        with pytest.raises(MlflowException) as denied:
            write()
        assert denied.value.error_code == "PERMISSION_DENIED", name
    assert "403 permission denied" in refusal(denied.value)
    assert sweep.get_run(run.info.run_id).data.metrics["AP"] == 0.25


def test_a_command_without_an_account_stops_in_one_line(server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = subprocess.run(
        [sys.executable, "-m", "clockdistill", "best-student", "--tracking-uri", server["url"], "--no-register"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=server["work"],
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "refused no credentials (401 not authenticated)" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_no_password_is_written_outside_the_accounts_file(server, monkeypatch):
    """The auth config holds none, the user store holds hashes; the runs, artifacts and the server's
    output hold none (checked after the other tests of this module have logged through the server)."""
    sweep = _client(server, monkeypatch, "sweep")
    run = sweep.create_run(sweep.get_experiment_by_name("kd-sweep").experiment_id)
    sweep.log_param(run.info.run_id, "lr", 1e-4)
    sweep.log_text(run.info.run_id, "a note", "note.txt")
    accounts = server["accounts"]
    secrets = [a["password"] for a in (accounts["admin"], accounts["sweep"], *accounts["readers"])]
    assert oct((server["work"] / "secrets" / "accounts.yaml").stat().st_mode & 0o777) == "0o600"
    assert not any(s in line for s in secrets for line in server["output"])  # what it printed when it came up
    for path in server["work"].rglob("*"):
        if path.is_file() and path.name != "accounts.yaml":
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
