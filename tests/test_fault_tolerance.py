"""Fault tolerance on the local multi-node cluster (real processes): a worker node dies while a trial
runs on it, and the sweep still finishes every trial with complete MLflow records."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, cluster_processes, tune_results
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EPOCHS = 4
DOWN_EPOCHS = 4


def _raylet_of(node: str, state: Path) -> int:
    """The raylet of `node` of the cluster whose state is in `state` (others may run on this machine)."""
    out = subprocess.run(["pgrep", "-f", f"raylet .*--static_resource_list={node},1"], capture_output=True, text=True)
    ours = set(cluster_processes(state))
    return next(int(pid) for pid in out.stdout.split() if int(pid) in ours)


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return seen


def test_a_worker_node_dies_mid_trial_and_every_trial_still_finishes(job_cluster, tiny_teacher, tmp_path):
    from mlflow.tracking import MlflowClient

    storage, db = tmp_path / "storage", tmp_path / "mlflow.db"
    spec = tmp_path / "ft.yaml"
    spec.write_text(
        f"name: ft\nteacher: {tiny_teacher}\nepochs: {EPOCHS}\nconfig:\n  train: {{batch_size: 8}}\n"
        "search_space:\n  train.lr: {grid: [4.0e-4, 3.0e-4, 2.0e-4, 1.0e-4]}\n"
        "search: {algorithm: grid}\nscheduler: {type: none}\nnum_samples: 1\nmax_concurrent_trials: 2\nmax_failures: "
        "3\n"
        f"resources: {{cpu: 1}}\nstorage_path: {storage}\nmlflow: {{tracking_uri: 'sqlite:///{db}', experiment: ft}}\n"
    )
    t0 = time.monotonic()
    job = subprocess.Popen(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--submission-id",
            "ft-1",
            "--working-dir",
            str(REPO),
            "--entrypoint-resources",
            '{"sweep_driver": 1}',
            "--",
            "clockdistill",
            "sweep",
            str(spec),
        ],
        env=job_cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # wait until a trial running on node_a has reported an epoch, then kill node_a
    state = Path(job_cluster["RAY_AUTH_TOKEN_PATH"]).parent
    node_a = _raylet_of("node_a", state)
    victim, deadline = None, time.monotonic() + 300
    while victim is None:
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"no trial reported from node_a; the job said: {job.communicate()[0][-4000:]}")
        for trial_id, rows in tune_results(storage, "ft").items():
            if rows[-1]["epoch"] < EPOCHS and node_a in _ancestors(rows[-1]["pid"]):
                victim = trial_id, rows[-1]["epoch"], rows[-1]["pid"]
        time.sleep(0.2)
    kill = subprocess.run(
        [str(REPO / "cluster" / "local" / "kill-node.sh"), "node_a", str(state)],
        env=job_cluster,
        capture_output=True,
        text=True,
    )
    assert kill.returncode == 0, kill.stderr
    killed_at = time.monotonic()
    output, _ = job.communicate(timeout=900)
    wall = time.monotonic() - t0
    assert job.returncode == 0, output[-4000:]

    # every trial ran its full budget; the killed one was retried from its checkpoint on node_b
    results = tune_results(storage, "ft")
    assert len(results) == 4
    trial_id, epoch_at_kill, pid_at_kill = victim
    epochs = [r["epoch"] for r in results[trial_id]]
    assert epochs[-1] == EPOCHS and set(range(1, EPOCHS + 1)) <= set(epochs)
    resumed = [r for r in results[trial_id] if r["epoch"] == epoch_at_kill + 1]
    recovery = resumed[0]["timestamp"] - (time.time() - (time.monotonic() - killed_at)) if resumed else None
    # the sweep's console: "tNN retry 1 of 3 from its last checkpoint (trial <id>): <why>", and the
    # retried trial's "finished ... after 1 retry"
    failures = {
        t: int(n)
        for n, t in re.findall(r"^t\d+ retry (\d+) of 3 from its last checkpoint \(trial (\w+)\)", output, re.M)
    }
    retries = sum(failures.values())
    assert failures.get(trial_id, 0) >= 1, output[-3000:]
    assert re.search(r"^t\d+ finished  best AP \d\.\d+ after \d/\d epochs, after \d+ retr", output, re.M), output[
        -3000:
    ]
    assert results[trial_id][-1]["pid"] != pid_at_kill  # a new worker process: node_a's died with it, so on node_b

    # MLflow: exactly one run per trial, finished, with every epoch's metrics
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ft")
    runs = client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_TRIAL))
    assert sorted(r.data.tags[S.TRIAL_ID_TAG] for r in runs) == sorted(results)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[S.FULL_BUDGET_TAG] == "true", run.data.tags
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "AP")) == list(range(1, EPOCHS + 1))
    # the cluster's token is nowhere in what the sweep wrote: MLflow store and artifacts, Tune's storage, the job log
    token = Path(job_cluster["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert token not in output
    for path in [db, *tmp_path.joinpath("mlartifacts").rglob("*"), *storage.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    print(
        f"\nfault tolerance: 4 trials, 1 node killed (node_a) at epoch {epoch_at_kill} of trial {trial_id}, {retries} "
        "retry(ies); "
        f"retried trial finished on node_b; results lost 0; sweep wall {wall:.0f} s; "
        f"kill -> next epoch of the retried trial {recovery if recovery is None else round(recovery, 1)} s"
    )


def test_the_mlflow_server_down_mid_sweep_loses_no_metric(tiny_teacher, tmp_path):
    """The server is down while epochs are reported: at least one report and two retry periods
    (the driver retries every 5 s), so the buffer, the failed retries and the replay are all real."""
    import signal

    from cdp import free_port
    from mlflow.tracking import MlflowClient

    state, port, storage = tmp_path / "mlflow", free_port(), tmp_path / "storage"

    def start_server() -> None:
        up = subprocess.run(
            [str(REPO / "cluster" / "local" / "mlflow.sh"), str(state), str(port)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert up.returncode == 0, up.stderr

    start_server()
    spec = tmp_path / "down.yaml"
    spec.write_text(
        f"name: down\nteacher: {tiny_teacher}\nepochs: {DOWN_EPOCHS}\nconfig:\n  train: {{batch_size: 8}}\n"
        "search_space:\n  train.lr: {grid: [4.0e-4, 2.0e-4]}\nsearch: {algorithm: grid}\nscheduler: {type: none}\n"
        f"num_samples: 1\nmax_concurrent_trials: 1\nresources: {{cpu: 1}}\nstorage_path: {storage}\n"
        f"mlflow: {{tracking_uri: 'http://127.0.0.1:{port}', experiment: down}}\n"
    )
    sweep = subprocess.Popen(
        [sys.executable, "-m", "sweeps", str(spec)],
        env=clean_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(rows for rows in tune_results(storage, "down").values()):
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep reported nothing"
        time.sleep(0.2)
    pid = int((state / "mlflow.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # gone at once, as a crashed server (a graceful stop lets the fast trials finish)
    down_at = time.monotonic()
    while subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode == 0:
        time.sleep(0.2)
    epochs_before = sum(len(r) for r in tune_results(storage, "down").values())
    while True:
        epochs_during = sum(len(r) for r in tune_results(storage, "down").values()) - epochs_before
        down_s = time.monotonic() - down_at
        if (epochs_during >= 1 and down_s >= 12) or down_s > 120 or sweep.poll() is not None:
            break
        time.sleep(0.5)
    start_server()
    output, _ = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, output[-4000:]
    assert "buffering its writes" in output and "reachable again" in output, output[-3000:]
    assert epochs_during > 0  # trials reported while the server was down

    client = MlflowClient(f"http://127.0.0.1:{port}")
    runs = client.search_runs([client.get_experiment_by_name("down").experiment_id], S.role_filter(S.ROLE_TRIAL))
    assert sorted(r.data.tags[S.TRIAL_ID_TAG] for r in runs) == sorted(tune_results(storage, "down"))
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[S.FULL_BUDGET_TAG] == "true"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "AP")) == list(
            range(1, DOWN_EPOCHS + 1)
        )
    subprocess.run(["pkill", "-g", str(int((state / "mlflow.pid").read_text()))], capture_output=True)
    print(
        f"\nmlflow down {down_s:.0f} s: {epochs_during} epoch report(s) arrived meanwhile, "
        "all written after the restart; lost 0"
    )
