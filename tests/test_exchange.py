"""Teacher outputs shared between runs on the same batch (clockdistill/distill/exchange.py): a run that
takes them computes no teacher forward and its losses are the ones it would have computed; on Ray
(sweeps/tune/exchange.py) across processes, and every fault leaves the run computing its own."""

import time

import pytest
import torch
from torch.utils.data import DataLoader

from clockdistill.config.layers import resolve_config
from clockdistill.data.transforms import collate
from clockdistill.distill.exchange import (
    COMPUTE,
    COMPUTE_AND_PUBLISH,
    LocalExchange,
    SharedOutputs,
    batch_key,
    to_device,
    to_host,
)
from clockdistill.distill.run import build_distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.engine import build_datasets
from clockdistill.metrics import TEACHER_SHARED
from clockdistill.models.common import Memory


def _cfg(teacher, **distill):
    return resolve_config(
        distill=True,
        config={
            "data": {"pad_to": "batch", "train_sizes": [96, 128], "hflip": 0.5},
            "train": {"device": "cpu", "progress": False, "batch_size": 4},
            "distill": distill,
        },
        teacher=teacher,
    )


def _batches(ds, cfg, n=2):
    ds.set_epoch(0)
    loader = DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=lambda b: collate(b)
    )
    return [batch for _, batch in zip(range(n), loader)]


def _counted(teacher: FrozenTeacher) -> dict[str, int]:
    """Counts the teacher's encoder and decoder passes."""
    counts = {"encode": 0, "decode": 0}
    for name in counts:
        inner = getattr(teacher.detector, name)

        def wrapped(*args, _inner=inner, _name=name, **kwargs):
            counts[_name] += 1
            return _inner(*args, **kwargs)

        setattr(teacher.detector, name, wrapped)
    return counts


@pytest.mark.parametrize(
    "a, b",
    [
        ({"method": "clockdistill", "logit": {"groups": 2, "random_queries": 2}}, {"memory": {"alpha": 1e-3}}),
        ({"method": "vanilla_kd"}, {"logit": {"temperature": 4.0}}),
        ({"method": "detrdistill"}, {"detrdistill": {"feature_weight": 2.0}}),
    ],
    ids=["clockdistill", "vanilla_kd", "detrdistill"],
)
def test_a_run_on_the_same_batch_takes_the_teachers_outputs_and_keeps_its_losses(tiny_teacher, a, b):
    cfg_a, cfg_b = _cfg(tiny_teacher, **a), _cfg(tiny_teacher, **a, **b)
    train_ds, _ = build_datasets(cfg_a)
    n = train_ds.num_classes
    leader = build_distiller(cfg_a, FrozenTeacher.load(tiny_teacher), n, torch.device("cpu"))
    follower_teacher = FrozenTeacher.load(tiny_teacher)
    follower = build_distiller(cfg_b, follower_teacher, n, torch.device("cpu"))
    alone = build_distiller(cfg_b, FrozenTeacher.load(tiny_teacher), n, torch.device("cpu"))
    leader.exchange = follower.exchange = LocalExchange()
    counts = _counted(follower_teacher)
    for images, mask, targets in _batches(train_ds, cfg_a):
        leader.losses(images, mask, targets)
        shared, _ = follower.losses(images, mask, targets)
        own, _ = alone.losses(images, mask, targets)
        assert shared.keys() == own.keys()
        for k in own:
            assert torch.equal(shared[k], own[k]), k
    assert counts == {"encode": 0, "decode": 0}
    assert follower.extra_metrics({})[TEACHER_SHARED] == 1.0
    assert leader.extra_metrics({})[TEACHER_SHARED] == 0.0


def test_runs_whose_queries_differ_share_the_memory_and_decode_their_own(tiny_teacher):
    """Label noise draws different target-aware queries in each run: the memory is shared, the
    decoder outputs are not (their key names the queries)."""
    cfg = _cfg(tiny_teacher, method="clockdistill", logit={"label_noise": 0.5})
    train_ds, _ = build_datasets(cfg)
    leader = build_distiller(cfg, FrozenTeacher.load(tiny_teacher), train_ds.num_classes, torch.device("cpu"))
    follower_teacher = FrozenTeacher.load(tiny_teacher)
    follower = build_distiller(cfg, follower_teacher, train_ds.num_classes, torch.device("cpu"))
    leader.exchange = follower.exchange = LocalExchange()
    counts = _counted(follower_teacher)
    batches = _batches(train_ds, cfg)
    for images, mask, targets in batches:
        leader.losses(images, mask, targets)
        follower.losses(images, mask, targets)
    assert counts == {"encode": 0, "decode": len(batches)}


def test_a_batch_is_named_by_its_images_views_and_pixels():
    images, mask = torch.rand(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    targets = [{"image_id": i, "size": torch.tensor([64, 96]), "view": 0} for i in (3, 4)]
    key = batch_key(images, mask, targets)
    assert key == batch_key(images.clone(), mask, targets)
    assert key != batch_key(images.flip(-1), mask, targets)  # another augmentation of the same images
    assert key != batch_key(images, mask, [{**targets[0], "view": 1}, targets[1]])
    assert key != batch_key(images[:, :, :, :80], mask[..., :80], targets)


def test_teacher_outputs_cross_a_process_boundary_unchanged():
    mem = Memory(
        torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool), [(1, 5)], torch.rand(2, 1, 2)
    )
    value = {"mem": mem, "layers": [{"pred_logits": torch.randn(2, 3, 2).bfloat16()}], "n": 3}
    back = to_device(to_host(value), "cpu")
    assert isinstance(back["mem"], Memory) and back["mem"].spatial_shapes == [(1, 5)] and back["mem"].features is None
    assert torch.equal(back["mem"].memory, mem.memory) and torch.equal(back["mem"].padding_mask, mem.padding_mask)
    assert back["layers"][0]["pred_logits"].dtype == torch.bfloat16
    assert torch.equal(back["layers"][0]["pred_logits"], value["layers"][0]["pred_logits"]) and back["n"] == 3


@pytest.mark.slow
def test_trials_on_ray_share_the_teacher_and_every_fault_falls_back_to_their_own():
    ray = pytest.importorskip("ray")
    from sweeps.tune.exchange import RayExchange, start_hub

    # (defined here: Ray's workers cannot import this file) a teacher output of 256 KB, over what Ray inlines
    def _value(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"memory": torch.randn(2, 2000, 16, generator=g), "boxes": [torch.rand(2, 5, 4, generator=g)]}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:

        @ray.remote(num_cpus=0)
        class Peer:  # a trial's process
            def __init__(self):
                from sweeps.tune.exchange import RayExchange as _Exchange

                self.shared = SharedOutputs(_Exchange.connect("t", "cpu"), "teacher")

            def get(self, key: str, delay: float, seed: int, wait_s: float = 30.0):
                import time as _time

                _time.sleep(delay)
                self.shared.exchange.wait_s, ran = wait_s, []

                def compute():
                    ran.append(True)
                    _time.sleep(0.5)  # a teacher forward: the peer asks meanwhile
                    return _value(seed)

                return self.shared.get(key, compute), bool(ran)

            def claim_only(self, key: str):  # a peer that dies while computing: claims, never publishes
                return self.shared.exchange.claim([self.shared.key(key)])

        hub = start_hub("t")
        a, b = Peer.remote(), Peer.remote()

        def both(key):  # the two on one batch, b asking once a has claimed it (whatever the load)
            before = ray.get(hub.stats.remote())["computed"]
            first = a.get.remote(key, 0.0, 1)
            deadline = time.monotonic() + 60
            while ray.get(hub.stats.remote())["computed"] == before and time.monotonic() < deadline:
                time.sleep(0.02)
            return ray.get([first, b.get.remote(key, 0.0, 2)])

        # the two on one batch: a computes and publishes, b takes its outputs (the same tensors)
        first, second = both("k1")
        assert first[1] and not second[1]
        assert torch.equal(first[0]["memory"], second[0]["memory"])
        assert torch.equal(first[0]["boxes"][0], second[0]["boxes"][0])
        # the peer that claimed a key died before publishing: the waiter computes after wait_s
        assert ray.get(a.claim_only.remote("k3")) == [COMPUTE_AND_PUBLISH]
        t0 = time.perf_counter()
        value, ran = ray.get(b.get.remote("k3", 0.0, 3, 0.5))
        assert ran and time.perf_counter() - t0 >= 0.5 and torch.equal(value["memory"], _value(3)["memory"])
        stats = ray.get(hub.stats.remote())
        assert stats["computed"] == 2 and stats["taken"] == 1 and stats["timed_out"] == 1
        # a trial whose outputs no peer reads stops publishing after 8 steps; a peer's ask (answered at
        # once: nothing will come) turns it on again
        lone, peer = RayExchange(hub, "cpu"), RayExchange(hub, "cpu")
        claims = [lone.claim([f"solo{i}"])[0] for i in range(9)]
        assert claims == [COMPUTE_AND_PUBLISH] * 8 + [COMPUTE]
        t0 = time.perf_counter()
        assert peer.wait("solo8") is None and time.perf_counter() - t0 < 10
        assert lone.claim(["solo9"]) == [COMPUTE_AND_PUBLISH]
        # the hub is gone: the trial computes from then on, and says so once
        ex = RayExchange(hub, "cpu")
        ray.kill(hub)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a kill lands asynchronously: calls may still run for a moment
            try:
                ray.get(hub.stats.remote(), timeout=10)
                time.sleep(0.1)
            except ray.exceptions.RayActorError:
                break
        value = SharedOutputs(ex, "teacher").get("k4", lambda: _value(5))
        assert torch.equal(value["memory"], _value(5)["memory"]) and ex.hub is None
    finally:
        ray.shutdown()
