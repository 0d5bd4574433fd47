"""Which Ray a sweep runs on: its own local Ray unless RAY_ADDRESS says otherwise, beside a cluster
that `ray start` runs on this machine, and in spite of the address file a dead one left behind."""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import clean_env, cluster_processes
from tests.cdp import free_port

PROBE = """
import json, logging, ray
from sweeps.tune.ray_connect import connect
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
where = connect(logging_level="ERROR")
print("WHERE", where)
print("AGAIN", connect(logging_level="ERROR"))  # a second sweep in the same process
print("GCS", ray.get_runtime_context().gcs_address)
print("RESOURCES", json.dumps(ray.cluster_resources()))
print("TASK", ray.get(ray.remote(lambda: 41 + 1).remote()))
ray.shutdown()
"""


def _probe(env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    return proc, lines


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")  # a cluster started with `ray start`: beside the other cluster tests, not amid them
def test_a_sweep_without_ray_address_runs_on_a_ray_of_its_own_beside_a_running_or_dead_cluster():
    ray_tmp = Path(tempfile.mkdtemp(prefix="cdr-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    token = ray_tmp / "token"
    token.write_text(secrets.token_hex(32))
    # Ray's address file (ray_current_cluster) lives under RAY_TMPDIR, not in /tmp/ray; token authentication on
    env = clean_env(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    ray_cli = str(Path(sys.executable).parent / "ray")

    # 1. a cluster died without `ray stop` and left its address file behind
    (ray_tmp / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    proc, out = _probe(env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert out["WHERE"] == "a local Ray of its own" and out["TASK"] == "42"
    assert out["AGAIN"] == "the Ray this process already uses"
    assert json.loads(out["RESOURCES"]).get("sweep_driver") == 100
    assert f"ignoring {dead}" in proc.stderr

    # 2. a cluster started with `ray start --head` is running on this machine
    port = free_port()
    start = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "1",
            "--include-dashboard=false",
            "--dashboard-agent-listen-port",  # not Ray's default port, which another Ray may hold
            str(free_port()),
            "--disable-usage-stats",
        ],
        env={**env, "CLOCKDISTILL_LOCAL_CLUSTER": str(ray_tmp)},  # marks its processes: see finally
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        proc, out = _probe(env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert out["WHERE"] == "a local Ray of its own" and out["TASK"] == "42"
        assert not out["GCS"].endswith(f":{port}")  # not the running cluster: a Ray of its own
        assert json.loads(out["RESOURCES"]).get("sweep_driver") == 100
        warning = next(line for line in proc.stderr.splitlines() if "is running on this machine" in line)
        assert (
            "RAY_ADDRESS=" in warning and f":{port} clockdistill sweep" in warning
        )  # and how to use that cluster instead

        # 3. the running cluster on purpose: RAY_ADDRESS
        proc, out = _probe({**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert out["WHERE"] == f"cluster 127.0.0.1:{port}" and out["GCS"].endswith(f":{port}") and out["TASK"] == "42"
        assert "sweep_driver" not in json.loads(out["RESOURCES"])  # its resources are the cluster's own
    finally:  # this cluster's processes only (`ray stop` would stop every Ray on the machine)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in cluster_processes(ray_tmp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while cluster_processes(ray_tmp) and time.monotonic() < deadline:
                time.sleep(0.5)
        assert not cluster_processes(ray_tmp)


def test_a_ray_address_where_nothing_answers_is_one_line():
    env = clean_env(RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    code = (
        "from sweeps.tune.ray_connect import connect\nfrom clockdistill.errors import UserError\n"
        "try:\n    connect()\nexcept UserError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ERR ")), "")
    assert "RAY_ADDRESS=127.0.0.1:" in line and "unset RAY_ADDRESS" in line, proc.stdout[-2000:] + proc.stderr[-2000:]
