"""Data-parallel trials on the local multi-node cluster (a head and two 1-CPU worker nodes, gloo):
a step on two workers equals a step on one with the same global batch; a sweep of two-worker trials
under ASHA gives every stopped trial's workers back."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clockdistill.config.layers import resolve_config
from conftest import on_cluster, tune_results
from sweeps.tracking import schema as S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster


def _raw(data: Path, preset: str) -> dict:
    return {
        "data": {"root": str(data), "pad_to": "max_size", "hflip": 0.5},
        "model": {"preset": preset, "frozen_bn": True},
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "lr_backbone": 1e-3,
            "warmup_iters": 0,
            "device": "cpu",
            "progress": False,
            "seed": 3,
        },
        "distill": {"method": "clockdistill", "logit": {"random_queries": 2}},
    }


def _random_teacher(preset: str, out: Path) -> Path:
    """A teacher checkpoint of `preset` with its initial weights (enough for a step comparison)."""
    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.data.synth import CLASSES
    from clockdistill.models.build import build_detector

    torch.manual_seed(0)
    cfg = resolve_config({"model": {"preset": preset}})
    save_checkpoint(out, build_detector(cfg.model, len(CLASSES)), {"config": cfg.to_dict(), "class_names": CLASSES})
    return out


def test_one_step_on_two_workers_equals_one_step_on_one(cluster, tmp_path):
    """On a faithful detector pair (Deformable DETR with box refinement: 4-d anchor target queries)."""
    from clockdistill.data.synth import write_synthetic
    from clockdistill.distill.run import run_distillation

    data = write_synthetic(tmp_path / "data", train=8, val=2, seed=5, progress=False)  # one global batch = one step
    raw = _raw(data, "deformable-detr-tiny-student-refine")
    tiny_teacher = _random_teacher("deformable-detr-tiny-teacher-refine", tmp_path / "teacher")
    code = f"""
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        def loop(c):
            import socket
            import ray.train, torch
            from clockdistill.config.layers import resolve_config
            from clockdistill.distill.run import run_distillation
            torch.set_num_threads(1)
            rank = ray.train.get_context().get_world_rank()
            cfg = resolve_config(distill=True, config=c["raw"], teacher=c["teacher"])
            cfg = cfg.updated({{"train.output_dir": c["out"] + f"/rank{{rank}}"}})
            assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == 2
            run_distillation(cfg)
            with open(c["out"] + f"/rank{{rank}}.host", "w") as f:
                f.write(ray.get_runtime_context().get_node_id())

        config = {{"raw": {raw!r}, "teacher": {str(tiny_teacher)!r}, "out": {str(tmp_path / "ddp")!r}}}
        TorchTrainer(loop, train_loop_config=config,
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={{"CPU": 1}}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="ddp-step", storage_path={str(tmp_path / "train-storage")!r})).fit()
        print("DDP-DONE")
    """
    out = on_cluster(cluster, code)
    assert "DDP-DONE" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]
    nodes = {(tmp_path / "ddp" / f"rank{r}.host").read_text() for r in (0, 1)}
    assert len(nodes) == 2  # the two ranks ran on the two worker nodes
    assert not (tmp_path / "ddp" / "rank1" / "last").exists()  # only rank 0 writes checkpoints

    cfg = resolve_config(distill=True, config=raw, teacher=tiny_teacher)
    cfg = cfg.updated({"train.output_dir": str(tmp_path / "single")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP worker (1 CPU)
    try:
        run_distillation(cfg)
    finally:
        torch.set_num_threads(threads)  # the rest of the session runs as before

    initial = resolve_config(distill=True, config=raw, teacher=tiny_teacher)
    two = load_file(tmp_path / "ddp" / "rank0" / "last" / "model.safetensors")
    one = load_file(tmp_path / "single" / "last" / "model.safetensors")
    assert two.keys() == one.keys()
    worst = max(((two[k].float() - one[k].float()).abs().max().item(), k) for k in one)
    assert worst[0] < 2e-5, worst
    # ... and the step did move the weights (the comparison is not between two untouched models)
    from clockdistill.distill.run import build_distiller
    from clockdistill.distill.teacher import FrozenTeacher

    fresh = build_distiller(initial, FrozenTeacher.load(tiny_teacher), 4, torch.device("cpu")).model.state_dict()
    moved = max((one[k].float() - fresh[k].float()).abs().max().item() for k in one if k in fresh)
    assert moved > 1e-4
    print(
        f"DDP step: max |w(2 workers) - w(1 process)| = {worst[0]:.2e} ({worst[1]}); the step moved weights by up to "
        f"{moved:.2e}"
    )


def test_a_sweep_of_two_worker_trials_under_asha_frees_every_stopped_trials_workers(
    cluster, tiny_teacher, synth_data, tmp_path
):
    spec = tmp_path / "ddp.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "ddp",
                "teacher": str(tiny_teacher),
                "student": "hybrid-tiny-student",
                "epochs": 3,
                "config": {"train": {"batch_size": 8, "warmup_iters": 0}, "model": {"frozen_bn": True}},
                # ASHA stops the second trial at its first rung (epoch 1): it has more parameters, a
                # difference no rounding changes (the APs of such short trials tie at 0 in some runs); had
                # it kept its workers' placement group, the check after the sweep finds it
                "search_space": {"model.enc_layers": {"grid": [1, 2]}},
                "search": {"algorithm": "grid"},
                "objective": {"metric": "params", "mode": "min"},
                "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                "num_samples": 1,
                "max_concurrent_trials": 1,
                "resources": {"cpu": 1, "workers": 2},
                "storage_path": str(tmp_path / "storage"),
                "max_failures": 0,
                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ddp"},
            }
        )
    )
    env = {**cluster["env"], "RAY_ADDRESS": cluster["dashboard"]}
    t0 = time.monotonic()
    submit = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--entrypoint-resources",
            '{"sweep_driver": 1}',
            "--",
            "clockdistill",
            "sweep",
            str(spec),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    wall = time.monotonic() - t0
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
    trials = tune_results(tmp_path / "storage", "ddp")
    assert len(trials) == 2
    epochs = sorted(rows[-1]["epoch"] for rows in trials.values())
    assert epochs[0] < 3 and epochs[-1] == 3, epochs  # ASHA stopped some, one ran the full budget
    assert all("checkpoint_path" in rows[-1] and "AP" in rows[-1] for rows in trials.values())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [
        r for r in client.search_runs([client.get_experiment_by_name("ddp").experiment_id]) if "trial_id" in r.data.tags
    ]
    assert len(runs) == 2
    full = [r for r in runs if r.data.tags.get(S.FULL_BUDGET_TAG) == "true"]
    assert full and all("best_checkpoint_sha256" in r.data.tags for r in full)  # best-student can export a DDP trial
    left = on_cluster(
        cluster,
        """
        import time
        from ray.util import placement_group_table
        for _ in range(30):
            free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
            live = [p for p in placement_group_table().values() if p["state"] != "REMOVED"]
            if free == total and not live:
                break
            time.sleep(1)
        print(json.dumps({"free": free, "total": total, "live": len(live)}))
    """,
    )
    state = json.loads(left.stdout.strip().splitlines()[-1])
    assert state == {"free": 2.0, "total": 2.0, "live": 0}, state
    print(f"DDP sweep: 2 trials x 2 workers, epochs run {epochs}, wall {wall:.0f} s")
