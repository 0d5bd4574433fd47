"""Accounts on the tracking server: MLflow's own basic-auth app, and the accounts this project uses.

    admin     created by the server itself on its first start (its password from the environment, as
              MLflow reads it); manages users and permissions
    sweep     the service account sweeps, best-student, report and sync run as: it creates the sweeps'
              experiments and registered models, so it manages them (MLflow gives a resource's
              creator MANAGE)
    readers   everyone else: every resource's default permission is READ, so they see every run and
              model and can log to, register into or move an alias of none of the sweeps'

Credentials live in one YAML file (never in a spec, a log, a param or an artifact), readable by its
owner only:

    admin: {username: admin, password: ...}
    sweep: {username: sweep, password: ...}
    readers: [{username: alice, password: ...}]

`clockdistill mlflow-server --accounts FILE` runs an authenticated server (`make mlflow-ui`;
`--new` writes the file with random passwords first) and creates the accounts; `clockdistill
accounts --accounts FILE --tracking-uri URL` creates them on a running server (the cluster's). Clients
authenticate with MLflow's standard variables, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD;
a 401 or 403 stops a command with one line (`refusal`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from clockdistill.errors import UserError

AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@dataclass(frozen=True)
class Account:
    username: str
    password: str


@dataclass(frozen=True)
class Accounts:
    admin: Account
    sweep: Account
    readers: tuple[Account, ...] = ()


def _account(entry, where: str) -> Account:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected {{username: NAME, password: SECRET}}, got {type(entry).__name__}")
    for key in ("username", "password"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise UserError(f"{where}.{key}: expected a non-empty string")
    return Account(entry["username"], entry["password"])


def load_accounts(path: str | Path) -> Accounts:
    """The accounts file, validated (one line naming the field otherwise); refused when others can
    read it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--accounts: {path} not found (clockdistill mlflow-server --accounts {path} --new writes one)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"--accounts: {path} is readable by others; chmod 600 {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with admin, sweep and readers")
    readers = raw.get("readers") or []
    if not isinstance(readers, list):
        raise UserError(f"{path}: readers: expected a list of {{username, password}}")
    accounts = Accounts(
        _account(raw.get("admin"), f"{path}: admin"),
        _account(raw.get("sweep"), f"{path}: sweep"),
        tuple(_account(r, f"{path}: readers[{i}]") for i, r in enumerate(readers)),
    )
    names = [a.username for a in (accounts.admin, accounts.sweep, *accounts.readers)]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: usernames must differ, got {names}")
    return accounts


def write_new_accounts(path: str | Path, readers: tuple[str, ...] = ("reader",)) -> Accounts:
    """A new accounts file with random passwords, readable by its owner only (never overwritten)."""
    path = Path(path)
    if path.exists():
        raise UserError(f"--new: {path} exists; it is never overwritten (drop --new to use it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "admin": {"username": "admin", "password": secrets.token_urlsafe(18)},
        "sweep": {"username": "sweep", "password": secrets.token_urlsafe(18)},
        "readers": [{"username": name, "password": secrets.token_urlsafe(18)} for name in readers],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return load_accounts(path)


def write_auth_config(state_dir: Path, admin: str) -> Path:
    """MLflow's basic-auth config (no password in it): users in `state_dir`/basic_auth.db, every
    resource READ by default."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "basic_auth.ini"
    path.write_text(AUTH_INI.format(database_uri=f"sqlite:///{(state_dir / 'basic_auth.db').resolve()}", admin=admin))
    return path


def server_environment(accounts: Accounts, config: Path) -> dict[str, str]:
    """What MLflow's auth app reads at start: its config, the admin's first password, a secret key."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": accounts.admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }


def _request(url: str, account: Account, body: dict) -> tuple[int, dict]:
    token = base64.b64encode(f"{account.username}:{account.password}".encode()).decode()
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except json.JSONDecodeError:
            return exc.code, {"message": text[:200]}


def create_accounts(tracking_uri: str, accounts: Accounts) -> list[str]:
    """The sweep account and the readers on the server at `tracking_uri`, created by its admin;
    existing ones are left as they are. Returns the usernames created."""
    created = []
    for account in (accounts.sweep, *accounts.readers):
        status, body = _request(
            tracking_uri.rstrip("/") + "/api/2.0/mlflow/users/create",
            accounts.admin,
            {"username": account.username, "password": account.password},
        )
        if status == 200:
            created.append(account.username)
        elif body.get("error_code") != "RESOURCE_ALREADY_EXISTS":
            raise UserError(
                f"{tracking_uri}: creating user {account.username} as {accounts.admin.username} failed "
                f"({status} {body.get('error_code') or body.get('message', '')})"
            )
    return created


def refusal(exc: BaseException) -> str | None:
    """One line for an MLflow 401 or 403 (None for anything else)."""
    code = getattr(exc, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "the tracking server")
    if code == "UNAUTHENTICATED":
        who = f"user {user}" if user else "no credentials"
        return (
            f"{uri} refused {who} (401 not authenticated): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to an account of its accounts file"
        )
    return (
        f"{uri} refused user {user} (403 permission denied): sweeps, best-student and sync need the sweep account, "
        "which owns the sweeps' experiments and models"
    )
