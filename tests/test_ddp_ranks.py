"""Data-parallel steps where the ranks differ (two gloo processes, no Ray).

A rank that leaves parameters out of its loss: without the auxiliary losses the earlier layers' heads
take no gradient, and a DINO or RT-DETR rank whose images hold no box never uses the denoising label
embedding. DDP failed the second step with "Expected to have finished reduction in the prior
iteration" (or hung the other rank); now three steps run on both ranks and their weights stay equal.

A rank whose loss diverges: it raised alone while the others waited in the gradient all-reduce until
the collective's timeout; now every rank raises TrainingDiverged at the same step."""

import hashlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _targets(boxes: bool) -> list[dict]:
    size = torch.tensor([64, 64])
    if not boxes:
        return [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "size": size}] * 2
    return [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "size": size}] * 2


def _task(preset: str, aux: bool, distil: bool):
    from clockdistill.config.layers import resolve_config
    from clockdistill.distill.distiller import Distiller
    from clockdistill.distill.teacher import FrozenTeacher
    from clockdistill.engine import DetectionTask
    from clockdistill.losses.criterion import SetCriterion, model_detection_weights
    from clockdistill.models.build import build_detector

    cfg = resolve_config({"model": {"preset": preset}, "loss": {"aux_loss": aux}})
    model = build_detector(cfg.model, 3)
    if distil:
        tcfg = resolve_config({"model": {"preset": preset.replace("student", "teacher")}})
        task = Distiller(FrozenTeacher(build_detector(tcfg.model, 3)), model, cfg)
    else:
        task = DetectionTask(model, SetCriterion.from_config(cfg.loss, 3), model_detection_weights(cfg.loss, cfg.model))
    return model, task


def _rank(rank: int, port: int, preset: str, aux: bool, distil: bool, empty_rank: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model, task = _task(preset, aux, distil)
        task.distribute(torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        torch.manual_seed(rank)
        for _ in range(3):
            images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
            losses, weights = task.losses(images, mask, _targets(rank != empty_rank))
            loss = sum(weights[k] * v for k, v in losses.items() if k in weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes()
        out.put((rank, "ok", hashlib.sha256(weights).hexdigest()))  # a tensor in the queue outlives no process
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, str(exc).splitlines()[0][:300], None))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "preset,aux,distil,empty_rank",
    [
        ("deformable-detr-tiny-student-refine", False, False, -1),  # per-layer heads without aux losses
        ("dino-tiny-student", True, False, 1),  # rank 1 has no box: no denoising queries there
        ("dino-tiny-student", True, True, 1),  # the same in a distillation step
    ],
)
def test_ranks_that_leave_parameters_unused_train_on(preset, aux, distil, empty_rank):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, preset, aux, distil, empty_rank, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=240) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(60)
    assert [r[1] for r in results] == ["ok", "ok"], results
    assert results[0][2] == results[1][2]  # gradients averaged: the ranks' weights are equal


def _diverging_rank(rank: int, port: int, out):
    from clockdistill.config.layers import resolve_config
    from clockdistill.engine import train_one_epoch
    from clockdistill.errors import TrainingDiverged

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model, task = _task("hybrid-tiny-student", True, False)
        task.distribute(torch.device("cpu"))
        cfg = resolve_config({"train": {"progress": False, "warmup_iters": 0, "clip_max_norm": 0.0}}).train
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        batches = []
        for i in range(3):
            images = torch.randn(2, 3, 64, 64)
            if rank == 1 and i == 1:
                images[0, :, :8, :8] = float("nan")  # one rank's second batch
            batches.append((images, torch.zeros(2, 64, 64, dtype=torch.bool), _targets(True)))
        params = list(model.parameters())
        train_one_epoch(task, batches, optimizer, torch.device("cpu"), cfg, 0, 0, 3, params)
        out.put((rank, "finished"))
    except TrainingDiverged as exc:
        out.put((rank, f"diverged: {exc}"))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
    finally:
        dist.destroy_process_group()


def test_a_rank_that_diverges_takes_every_rank_down_at_once():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_diverging_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=90) for _ in procs)  # before: rank 0 waited out the 120 s timeout
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert results[1].startswith("diverged: rank 1: ") and "epoch 1, step 1" in results[1], results
    assert results[0].startswith("diverged: ") and "another rank" in results[0] and "step 1" in results[0], results
