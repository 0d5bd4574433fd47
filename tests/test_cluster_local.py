"""cluster/local/: a head and two worker nodes on this machine (real raylets, token auth) and a
local MLflow server, started and stopped by the scripts users run."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cdp import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    return env


def test_local_cluster_has_three_nodes_with_their_resources_and_refuses_requests_without_the_token(tmp_path):
    state = tmp_path / "cluster"
    proc = subprocess.run([str(REPO / "cluster" / "local" / "start.sh"), str(state)], env=_env(), capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        token = state / "token"
        assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) == 64
        head = (state / "head_port").read_text().strip()
        probe = ("import json, ray; ray.init(address='127.0.0.1:%s', logging_level='ERROR'); "
                 "print(json.dumps([{k: v for k, v in n['Resources'].items() if not k.startswith('node:') and 'memory' not in k} "
                 "for n in ray.nodes() if n['Alive']]))" % head)
        env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        assert sorted(nodes, key=json.dumps) == sorted([{"sweep_driver": 2.0}, {"CPU": 1.0, "node_a": 1.0}, {"CPU": 1.0, "node_b": 1.0}],
                                                       key=json.dumps)
        dashboard = f"http://127.0.0.1:{(state / 'dashboard_port').read_text().strip()}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(dashboard, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(dashboard, headers={"Authorization": f"Bearer {token.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        port = free_port()
        uri = subprocess.run([str(REPO / "cluster" / "local" / "mlflow.sh"), str(state), str(port)], env=_env(), capture_output=True,
                             text=True, timeout=180)
        assert uri.returncode == 0 and uri.stdout.strip() == f"http://127.0.0.1:{port}", uri.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
    finally:
        subprocess.run([str(REPO / "cluster" / "local" / "stop.sh"), str(state)], env=_env(), capture_output=True, timeout=180)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    assert subprocess.run(["pgrep", "-f", "raylet"], capture_output=True).returncode == 1  # no raylet left
