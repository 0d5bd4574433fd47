import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes on two cores: one thread each (and their subprocesses)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # oversubscribed OpenMP threads spin and slow everything down

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clockdistill.data.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic COCO-format data set shared by the tests (read-only by convention)."""
    return write_synthetic(tmp_path_factory.mktemp("synth"), train=24, val=8, seed=0, progress=False)


def write_coco(root: Path, split: str, images, annotations, categories=None, make_images=True) -> Path:
    """Write a hand-made COCO data set; images are blank PNGs of the declared size."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    if make_images:
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(
                root / "images" / split / img["file_name"]
            )
    doc = {"images": images, "annotations": annotations, "categories": categories or [{"id": 1, "name": "thing"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clockdistill", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def tiny_teacher(synth_data, tmp_path_factory) -> Path:
    """A hybrid-tiny-teacher checkpoint trained for two quick epochs on `synth_data` (its `best` directory)."""
    from clockdistill.config.layers import resolve_config
    from clockdistill.engine import fit

    out = tmp_path_factory.mktemp("teacher")
    cfg = resolve_config(
        {
            "data": {"root": str(synth_data)},
            "model": {"preset": "hybrid-tiny-teacher"},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 4e-4,
                "lr_backbone": 4e-4,
                "clip_max_norm": 1.0,
                "device": "cpu",
                "output_dir": str(out),
                "progress": False,
            },
        }
    )
    fit(cfg)
    return out / "best"


def clean_env(**extra) -> dict:
    """This environment without the caller's Ray address, Ray token and MLflow store, with the
    venv's commands (ray, mlflow) first on PATH, plus `extra`."""
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return {**env, **extra}


@contextlib.contextmanager
def local_cluster_at(state: Path):
    """cluster/local/start.sh with its state in `state` (a head and two worker nodes, token auth),
    stop.sh afterwards. Yields {state, token, head (host:port), dashboard (URL), env (a clean
    environment with the cluster's token)}."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [str(repo / "cluster" / "local" / "start.sh"), str(state)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield {
            "state": state,
            "token": state / "token",
            "head": f"127.0.0.1:{(state / 'head_port').read_text().strip()}",
            "dashboard": f"http://127.0.0.1:{(state / 'dashboard_port').read_text().strip()}",
            "env": clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "token")),
        }
    finally:
        subprocess.run(
            [str(repo / "cluster" / "local" / "stop.sh"), str(state)], env=clean_env(), capture_output=True, timeout=180
        )
        left = cluster_processes(state)
        assert not left, f"stop.sh left {len(left)} process(es) of the cluster running: {left[:5]}"


def cluster_processes(state: Path) -> list[int]:
    """PIDs of the processes a `local_cluster_at` cluster started: they carry start.sh's marker, and
    Ray's agents and workers (whose environment Ray sets itself) name one of their raylets."""
    marker = f"CLOCKDISTILL_LOCAL_CLUSTER={Path(state).resolve()}".encode()
    environs = {}
    for path in Path("/proc").glob("[0-9]*/environ"):
        try:
            environs[int(path.parent.name)] = path.read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
    marked = {pid for pid, env in environs.items() if marker in env}
    raylets = {f"RAY_RAYLET_PID={pid}".encode() for pid in marked}
    return sorted(marked | {pid for pid, env in environs.items() if raylets & set(env)})


@pytest.fixture
def job_cluster(tmp_path):
    """A fresh `local_cluster_at` cluster for one test that kills part of it: yields the environment
    for `ray job` commands (RAY_ADDRESS = its dashboard, its token)."""
    with local_cluster_at(tmp_path / "cluster") as c:
        yield {**c["env"], "RAY_ADDRESS": c["dashboard"]}


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory):
    """One `local_cluster_at` cluster for every test that leaves its nodes alive (starting and
    stopping one costs about 30 s). Those tests run last, one after the other (see
    pytest_collection_modifyitems), so the idle cluster costs the rest of the suite nothing."""
    with local_cluster_at(tmp_path_factory.mktemp("shared-cluster")) as c:
        yield c


@pytest.fixture
def shared_job_env(shared_cluster):
    """The environment for `ray job` commands on the shared cluster (RAY_ADDRESS, its token)."""
    return {**shared_cluster["env"], "RAY_ADDRESS": shared_cluster["dashboard"]}


# Tests run in two processes (make test: pytest -n 2 --dist loadgroup): most wait on Ray, MLflow or
# subprocesses more than they compute. Tests that share an expensive session fixture run in one
# process (one fixture), and every test of a multi-node local cluster runs in one process, one after
# the other (a node-kill test and the shared cluster never overlap).
GROUPS = {"shared_cluster": "cluster", "job_cluster": "cluster", "tiny_sweep": "tiny_sweep"}


def pytest_itemcollected(item):  # as each test is collected: before xdist reads the groups
    names = getattr(item, "fixturenames", ())
    for fixture, group in GROUPS.items():
        if fixture in names and not any(m.args[:1] == (group,) for m in item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(group))
            break


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: "shared_cluster" in getattr(item, "fixturenames", ()))  # stable: order kept otherwise


def on_cluster(cluster: dict, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python `code` (dedented; `json` and a connected `ray` in scope) on a `local_cluster_at`
    cluster, in a fresh process with the cluster's token."""
    import textwrap

    script = f"import json, ray\nray.init(address={cluster['head']!r}, logging_level='ERROR')\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


def tune_results(storage: Path, sweep: str) -> dict[str, list[dict]]:
    """{trial id: its result rows}, straight from Tune's result.json files (no MLflow involved)."""
    rows = {}
    for path in storage.glob(f"{sweep}/train_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def run_sweep_cli(spec: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m sweeps SPEC --summary cwd/summary.json [args]` on an in-process local Ray (no
    RAY_ADDRESS, no MLFLOW_TRACKING_URI from the caller); fails the test unless it exits 0."""
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps", str(spec), "--summary", str(cwd / "summary.json"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def memorised_data(root: Path, n: int = 6) -> Path:
    """n synthetic images whose val (and test) split is the train split: a detector that memorises them
    scores a high AP within seconds, so trials of a tiny sweep differ measurably."""
    import shutil

    data = write_synthetic(root, train=n, val=0, seed=0, progress=False)
    for split in ("val", "test"):  # the test split too: best-student's held-out figures run on it
        shutil.copytree(data / "images" / "train", data / "images" / split, dirs_exist_ok=True)
        shutil.copy(data / "annotations" / "instances_train.json", data / "annotations" / f"instances_{split}.json")
    return data


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A finished 4-trial sweep (real Ray, real MLflow SQLite store) with a teacher that memorised
    its 6 images (AP about 0.9), one trial at a time in a reused process, reading decoded images and
    teacher outputs from node caches under root/cache: {root, tracking_uri, spec, storage, summary,
    teacher, data}."""
    from clockdistill.config.layers import resolve_config
    from clockdistill.engine import fit

    root = tmp_path_factory.mktemp("tiny-sweep")
    data = memorised_data(root / "data")
    cfg = resolve_config(
        {
            "data": {"root": str(data)},
            "model": {"preset": "hybrid-tiny-teacher"},
            "train": {
                "epochs": 200,
                "batch_size": 6,
                "lr": 1e-3,
                "lr_backbone": 1e-3,
                "weight_decay": 0.0,
                "warmup_iters": 0,
                "clip_max_norm": 1.0,
                "eval_every": 50,
                "device": "cpu",
                "output_dir": str(root / "teacher"),
                "progress": False,
            },
        }
    )
    fit(cfg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = root / "tiny.yaml"
    spec.write_text(
        f"name: tiny\nteacher: {root / 'teacher' / 'best'}\nstudent: hybrid-tiny-teacher\nepochs: 2\n"
        "config:\n  train: {batch_size: 6, weight_decay: 0.0, warmup_iters: 0, clip_max_norm: 1.0}\n"
        "  distill: {init_student: true, teacher_cache: 'on'}\n"
        f"  data: {{pad_to: max_size, decoded_cache: true, cache_dir: '{root / 'cache'}'}}\n"
        "search_space:\n  train.lr: {grid: [1.0e-4, 2.0e-3, 1.0e-5, 3.0e-4]}\n  distill.logit.temperature: {choice: "
        "[1, 10]}\n"
        "search: {algorithm: grid, seed: 1}\nscheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n"
        "num_samples: 1\nmax_concurrent_trials: 1\nresources: {cpu: 1}\n"
        f"storage_path: {root / 'storage'}\nmlflow: "
        f"{{tracking_uri: '{uri}', experiment: tiny, registered_model: hybrid-tiny-student}}\n"
    )
    proc = run_sweep_cli(spec, root)
    return {
        "root": root,
        "tracking_uri": uri,
        "spec": spec,
        "storage": root / "storage",
        "summary": json.loads((root / "summary.json").read_text()),
        "teacher": root / "teacher" / "best",
        "data": data,
        "stdout": proc.stdout,
    }


def fit_one_batch(preset: str, steps: int = 60):
    """`steps` AdamW steps (lr 1e-3) of a fresh `preset` detector on one fixed 2-image batch, its training
    queries (denoising) included; returns (the weighted loss of every step, the last step's terms, the
    config). Seed 0; one thread per test worker (OMP_NUM_THREADS)."""
    import torch

    from clockdistill.config.layers import resolve_config
    from clockdistill.losses.criterion import SetCriterion, model_detection_weights, weighted_sum
    from clockdistill.models.build import build_detector

    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": preset}})
    model = build_detector(cfg.model, 3).train()
    criterion = SetCriterion.from_config(cfg.loss, 3)
    weights = model_detection_weights(cfg.loss, cfg.model)
    images, mask = torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history, losses = [], {}
    for _ in range(steps):
        losses = criterion(model(images, mask, targets=targets), targets)
        total = weighted_sum(losses, weights)
        history.append(float(total.detach()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return history, losses, cfg
