"""Run variants of the demo sweep for the benchmarks (each in its own local Ray and MLflow store).

`run_variant(name, workdir, overrides)` writes the demo spec (sweeps/configs/demo.yaml) with the
overrides under <workdir>/bench/<name>/, runs `python -m sweeps` on it, and returns the sweep's
wall time, its start (unix seconds) and every trial's result rows from Tune's result.json files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clockdistill.config.dotted import parse_yaml


def ensure_teacher(workdir: Path) -> Path:
    """The demo teacher under `workdir` (trained by a one-trial `clockdistill demo` when missing)."""
    teacher = workdir / "teacher" / "best"
    if not (teacher / "meta.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "clockdistill",
                "demo",
                "--workdir",
                str(workdir),
                "--trials",
                "1",
                "--sweep-epochs",
                "1",
            ],
            check=True,
        )
    return teacher


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out.get(key) or {}, value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def run_variant(name: str, workdir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from sweeps.demo import demo_spec

    teacher = ensure_teacher(workdir)
    out = workdir / "bench" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = parse_yaml(demo_spec(workdir).read_text())
    spec.update(
        name=name,
        teacher=str(teacher),
        storage_path=str(out / "storage"),
        mlflow={"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": f"bench-{name}"},
    )
    spec = _merge(spec, {"config": {"data": {"cache_dir": str(out / "cache")}}})  # a fresh node cache
    spec = _merge(spec, overrides)
    path = out / "spec.yaml"
    path.write_text(json.dumps(spec, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "sweeps", str(path)], env=env, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        sys.exit(f"{name}: the sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    trials = {}
    for result in (out / "storage").glob(f"{name}/train_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials[rows[0]["trial_id"]] = rows
    return {"wall_s": wall, "started": started, "trials": trials, "spec": spec}
