"""cluster/local/: a head and two worker nodes on this machine (real raylets, token auth) and a
local MLflow server, started and stopped by the scripts users run; the storage preflight on it."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cdp import free_port

from conftest import clean_env, on_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def local_cluster(shared_cluster):
    return shared_cluster


def test_three_nodes_with_their_resources_and_no_request_without_the_token(local_cluster):
    token = local_cluster["token"]
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) == 64
    # polled for a while: a node that has just registered may not have published its resources yet
    out = on_cluster(
        local_cluster,
        "import time\n"
        "for _ in range(20):\n"
        "    nodes = [{k: v for k, v in n['Resources'].items() if not k.startswith('node:') and 'memory' not in k}"
        " for n in ray.nodes() if n['Alive']]\n"
        "    if len(nodes) == 3 and all(len(n) > 1 or 'sweep_driver' in n for n in nodes):\n"
        "        break\n"
        "    time.sleep(1)\n"
        "print(json.dumps(nodes))",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [{"sweep_driver": 2.0}, {"CPU": 1.0, "node_a": 1.0}, {"CPU": 1.0, "node_b": 1.0}]
    by_content = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731 - Ray lists resource keys in no fixed order
    assert sorted(nodes, key=by_content) == sorted(expected, key=by_content), nodes
    jobs = local_cluster["dashboard"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(jobs, timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(
        urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token.read_text().strip()}"}), timeout=10
    ) as r:
        assert r.status == 200


def test_storage_preflight_runs_on_every_node(local_cluster, tmp_path):
    out = on_cluster(
        local_cluster,
        "from sweeps.tune.preflight import check_storage\n"
        f"print(check_storage({str(tmp_path / 'shared')!r}))\n"
        "try:\n    check_storage('/proc/clockdistill-storage')\nexcept Exception as exc:\n    print(exc)\n",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "3"
    assert re.match(
        r"storage_path: /proc/clockdistill-storage is not shared and writable on node \S+ \(and 2 more node\(s\)\): ",
        lines[-1],
    )
    assert not list((tmp_path / "shared" / ".clockdistill-preflight").iterdir())  # probes cleaned up


def test_local_mlflow_server_starts_on_loopback_and_stops(tmp_path):
    port, state = free_port(), tmp_path / "mlflow-state"
    uri = subprocess.run(
        [str(REPO / "cluster" / "local" / "mlflow.sh"), str(state), str(port)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert uri.returncode == 0 and uri.stdout.strip() == f"http://127.0.0.1:{port}", uri.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        assert response.status == 200
    pid = int((state / "mlflow.pid").read_text())
    subprocess.run(
        [str(REPO / "cluster" / "local" / "stop.sh"), str(state)],
        env=clean_env(),
        capture_output=True,
        timeout=180,
    )
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_sweep_with_unwritable_storage_stops_before_any_trial(tiny_teacher, tmp_path):
    spec = tmp_path / "s.yaml"
    db = tmp_path / "mlflow.db"
    spec.write_text(
        f"name: nostore\nteacher: {tiny_teacher}\nepochs: 1\nsearch_space:\n  distill.memory.alpha: "
        f"{{uniform: [1.0e-5, 1.0e-4]}}\n"
        f"num_samples: 1\nstorage_path: /proc/clockdistill-storage\nmlflow: {{tracking_uri: 'sqlite:///{db}'}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps", str(spec)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "error: storage_path: /proc/clockdistill-storage is not shared and writable" in proc.stderr
    assert not db.exists()  # no sweep run, no trial run
