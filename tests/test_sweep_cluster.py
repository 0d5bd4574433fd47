"""A real sweep on the local multi-node cluster (cluster/local: a head that hosts the driver, two
worker nodes that run the trials, token auth on) through `ray job submit`, tracked in a real MLflow
store; the driver is killed with SIGKILL mid-sweep and the same job launched again: it resumes,
and nothing that had finished is run or recorded again."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tune_results
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _submit(env, submission_id: str, spec: Path, wait: bool) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--entrypoint-resources",
        '{"sweep_driver": 1}',
        "--",
        "clockdistill",
        "sweep",
        str(spec),
    ]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _children(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_TRIAL))


def test_a_killed_driver_resumes_on_relaunch_without_rerunning_finished_trials(shared_job_env, tiny_teacher, tmp_path):
    from mlflow.tracking import MlflowClient

    storage, db = tmp_path / "storage", tmp_path / "mlflow.db"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        f"name: tiny\nteacher: {tiny_teacher}\nepochs: 2\nconfig:\n  train: {{batch_size: 8}}\n"
        "search_space:\n  distill.memory.alpha: {loguniform: [1.0e-5, 1.0e-2]}\n  distill.logit.temperature: {choice: "
        "[1, 2, 4, 10]}\n"
        "search: {algorithm: tpe, seed: 0}\nscheduler: {type: none}\nnum_samples: 3\nbaseline_trial: true\n"
        "max_concurrent_trials: 2\n"
        f"resources: {{cpu: 1}}\nstorage_path: {storage}\nmlflow: "
        f"{{tracking_uri: 'sqlite:///{db}', experiment: tiny}}\n"
    )
    client = MlflowClient(f"sqlite:///{db}")

    # 1. Launch, wait for a first finished trial, then kill the driver (SIGKILL: no chance to save anything).
    t0 = time.monotonic()
    first = _submit(shared_job_env, "tiny-first", spec, wait=False)
    deadline = time.time() + 600
    finished_before: dict[str, int] = {}
    while time.time() < deadline:
        time.sleep(2)
        try:
            runs = _children(client, "tiny")
        except Exception:  # the store may be mid-creation
            continue
        finished_before = {
            r.data.tags[S.TRIAL_ID_TAG]: r.info.end_time
            for r in runs
            if r.info.status == "FINISHED" and r.data.tags.get(S.FULL_BUDGET_TAG) == "true"
        }
        if finished_before:
            break
    assert finished_before, "no trial finished within 10 minutes"
    kill = subprocess.run(
        [str(REPO / "cluster" / "local" / "kill-driver.sh"), "tiny-first"],
        env=shared_job_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert kill.returncode == 0, kill.stdout + kill.stderr
    killed_at = time.monotonic()
    first.wait(timeout=120)
    assert first.returncode != 0  # the job failed with its driver
    assert len(finished_before) < 4, "the sweep finished before the driver could be killed"
    rows_at_kill = {t: len(rows) for t, rows in tune_results(storage, "tiny").items()}

    # 2. Launch the same sweep again: it resumes.
    relaunched = time.monotonic()
    proc = _submit(shared_job_env, "tiny-second", spec, wait=True)
    second_wall = time.monotonic() - relaunched
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming sweep tiny" in proc.stdout + proc.stderr

    # 3. MLflow: one parent, four children with their tags, params and per-epoch AP; nothing duplicated.
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], S.role_filter(S.ROLE_SWEEP))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["spec.epochs"] == "2" and "space.distill.memory.alpha" in parent.data.params
    assert "teacher_AP" in parent.data.metrics and parent.data.tags["git_sha"]
    children = _children(client, "tiny")
    trial_ids = [r.data.tags[S.TRIAL_ID_TAG] for r in children]
    assert len(children) == 4 and len(set(trial_ids)) == 4
    for run in children:
        tags = run.data.tags
        assert tags[S.PARENT_RUN_TAG] == parent.info.run_id and tags[S.SWEEP_ID_TAG] == "tiny"
        assert tags[S.FULL_BUDGET_TAG] == "true" and run.info.status == "FINISHED"
        method = "none" if tags.get(S.BASELINE_TAG) == "true" else "clockdistill"
        assert run.data.params["distill.method"] == method and "distill.memory.alpha" in run.data.params
        ap = client.get_metric_history(run.info.run_id, "AP")
        assert sorted(m.step for m in ap) == [1, 2], (tags[S.TRIAL_ID_TAG], [(m.step, m.value) for m in ap])
        assert ("kd_mem_fg" in run.data.metrics) == (method == "clockdistill") and "loss_giou" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id, S.CHECKPOINT_ARTIFACT)} >= {
            "best_checkpoint/model.safetensors",
            "best_checkpoint/meta.json",
        }
    # the no-KD trial once, whether it ended before the kill or after (the searcher keeps its id)
    assert [r.info.run_name for r in children if r.data.tags.get(S.BASELINE_TAG) == "true"] == ["t01 no-KD baseline"]
    # Trials that had finished before the kill were not run (nor closed) again.
    for run in children:
        if run.data.tags[S.TRIAL_ID_TAG] in finished_before:
            assert run.info.end_time == finished_before[run.data.tags[S.TRIAL_ID_TAG]]

    # 4. Ray storage: each trial's results (one line per epoch: a finished trial was not rerun) and
    # checkpoints. (A trial killed before the experiment state was saved may leave a directory the
    # restored sweep does not know; its MLflow run was retired above.)
    for tid in trial_ids:
        dirs = list((storage / "tiny").glob(f"train_trial_{tid}_*"))
        assert len(dirs) == 1, (tid, dirs)
        lines = [json.loads(line) for line in (dirs[0] / "result.json").read_text().splitlines() if line.strip()]
        epochs = [row["epoch"] for row in lines]
        assert epochs[-1] == 2, (tid, epochs)
        if tid in finished_before:
            assert epochs == [1, 2], (tid, epochs)
        assert any((c / "model.safetensors").is_file() for c in dirs[0].glob("checkpoint_*"))

    results = tune_results(storage, "tiny")
    redone = sum(len(results[t]) - len({r["epoch"] for r in results[t]}) for t in trial_ids)
    print(
        f"\ndriver kill: 4 trials, killed after {killed_at - t0:.0f} s with {len(finished_before)} finished and "
        f"{sum(rows_at_kill.values())} epoch(s) reported; relaunch finished the sweep in {second_wall:.0f} s; "
        f"epochs run again {redone}; finished trials rerun 0; results lost 0"
    )
