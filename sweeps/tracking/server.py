"""`clockdistill mlflow-server`: MLflow's server with its basic-auth app and this project's accounts
(sweeps/tracking/accounts.py), in the foreground until interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from clockdistill.errors import UserError
from sweeps.tracking.accounts import (
    create_accounts,
    load_accounts,
    server_environment,
    write_auth_config,
    write_new_accounts,
)

START_TIMEOUT = 120.0


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def serve_with_accounts(accounts_file: str, new: bool, backend: str, state: Path, host: str, port: int) -> int:
    path = Path(accounts_file).expanduser()
    if new and not path.exists():
        accounts = write_new_accounts(path)
        print(f"wrote {path} (random passwords, readable by you only)")
    else:
        accounts = load_accounts(path)
    config = write_auth_config(state, accounts.admin.username)
    env = {**os.environ, **server_environment(accounts, config)}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _up(url):
            if proc.poll() is not None:
                raise UserError(f"mlflow server exited with {proc.returncode} before it came up on {url}")
            if time.monotonic() > deadline:
                raise UserError(f"mlflow server did not come up on {url} within {START_TIMEOUT:.0f}s")
            time.sleep(0.5)
        created = create_accounts(url, accounts)
        names = [a.username for a in accounts.readers]
        print(
            f"MLflow at {url} with accounts ({path}): admin {accounts.admin.username}, sweep account "
            f"{accounts.sweep.username}, readers {', '.join(names) or '-'} (created now: {', '.join(created) or '-'}). "
            f"Clients: MLFLOW_TRACKING_URI={url} MLFLOW_TRACKING_USERNAME=<user> "
            "MLFLOW_TRACKING_PASSWORD=<its password>",
            flush=True,
        )
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
