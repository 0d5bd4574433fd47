"""Node-local caches: decoded images and teacher outputs give what the live path gives."""

import logging
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from clockdistill.arrowcache import build_once
from clockdistill.config.layers import resolve_config
from clockdistill.data.transforms import collate
from clockdistill.distill.cache import TeacherCache, prepare_teacher_cache
from clockdistill.distill.run import build_distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.engine import build_datasets
from clockdistill.errors import ConfigError, DataError
from sweeps.tracking import schema as S

# the two row layouts: a fixed canvas, and batches padded to their largest image (rows keyed by the image
# alone: the teacher padding-invariant, batches padded to a multiple of its largest stride, 32)
CANVAS = {"pad_to": "max_size"}
PER_IMAGE = {"pad_to": "batch", "pad_multiple": 32}


def _cfg(teacher, cache_dir, data_keys=CANVAS, **distill):
    data = {**data_keys, "train_sizes": [96, 128], "hflip": 0.5, "cache_dir": str(cache_dir)}
    return resolve_config(
        distill=True,
        config={
            "data": data,
            "train": {"device": "cpu", "progress": False, "batch_size": 4},
            "distill": {"teacher_cache": "on", **distill},
        },
        teacher=teacher,
    )


def _loader(ds, cfg, epoch):
    ds.set_epoch(epoch)
    g = torch.Generator().manual_seed(epoch)
    return DataLoader(
        ds,
        batch_size=4,
        shuffle=True,
        generator=g,
        collate_fn=lambda b: collate(b, pad_to=cfg.data.canvas, multiple=cfg.data.pad_multiple),
    )


@pytest.mark.parametrize(
    "distill",
    [
        {"method": "clockdistill", "logit": {"random_queries": 3, "groups": 2}},
        {"method": "clockdistill", "memory": {"with_pos": True}, "logit": {"layers": "last"}},
        {"method": "vanilla_kd"},
        {"method": "fitnet"},
    ],
    ids=["clockdistill", "with_pos", "vanilla_kd", "fitnet"],
)
@pytest.mark.parametrize("layout", [CANVAS, PER_IMAGE], ids=["canvas", "per_image"])
def test_losses_with_the_teacher_cache_equal_the_live_teacher(tiny_teacher, tmp_path, distill, layout):
    cfg = _cfg(tiny_teacher, tmp_path / "cache", layout, **distill)
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    distiller = build_distiller(cfg, teacher, train_ds.num_classes, torch.device("cpu"))
    cache = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    assert cache is not None and cache.path.is_file()
    assert cache.layout == ("image" if layout is PER_IMAGE else "canvas")
    views, canvases = set(), set()
    for epoch in range(2):  # two epochs: both flips and both sizes turn up
        for images, mask, targets in _loader(train_ds, cfg, epoch):
            views |= {(int(max(t["size"].tolist())), t["view"]) for t in targets}
            canvases.add(tuple(images.shape[-2:]))
            distiller.cache = None
            live, _ = distiller.losses(images, mask, targets)
            distiller.cache = cache
            cached, _ = distiller.losses(images, mask, targets)
            assert live.keys() == cached.keys()
            kd = [k for k in live if k.startswith("kd_")]
            assert kd
            for k in kd:  # memory cached in fp16 (relative rounding 4.9e-4), decoder outputs in fp32
                a, b = live[k].item(), cached[k].item()
                rtol, atol = (2e-3, 1e-5) if k.startswith(("kd_mem", "kd_fitnet")) else (1e-4, 1e-6)
                assert abs(a - b) <= rtol * abs(a) + atol, (k, a, b)
    assert views == {(96, 0), (96, 1), (128, 0), (128, 1)}
    assert any(live[k].item() > 1e-3 for k in kd)  # the terms compared are not all zero
    if layout is PER_IMAGE:  # batches of mixed sizes, padded to several canvases
        assert len(canvases) > 1


def test_cached_memory_is_the_teacher_memory_of_that_view(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path / "cache", method="memory_only")
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    cache = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    for i in (0, 5):
        plain = collate([train_ds.view_item(i, 0, 128)], pad_to=cfg.data.canvas)
        flipped = collate([train_ds.view_item(i, 1, 128)], pad_to=cfg.data.canvas)
        live = teacher.encode(plain[0], plain[1]).memory
        assert torch.allclose(cache.memory(plain[2], torch.device("cpu")), live, rtol=2e-3, atol=2e-3)
        assert not torch.allclose(cache.memory(flipped[2], torch.device("cpu")), live, rtol=2e-3, atol=2e-3)


def test_cache_size_is_reported_before_building_and_a_limit_falls_back(tiny_teacher, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = _cfg(tiny_teacher, tmp_path / "cache", teacher_cache_max_gb=1e-6)
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    assert prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu")) is None
    assert "> distill.teacher_cache_max_gb=1e-06; using the live teacher" in caplog.text
    assert not (tmp_path / "cache" / "teacher").exists() or not any((tmp_path / "cache" / "teacher").glob("*.arrow"))
    caplog.clear()
    cfg = cfg.updated({"distill.teacher_cache_max_gb": 20.0})
    cache = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache:"))
    assert "building" in line and f"{len(train_ds) * 4} entries" in line
    size_text = line.split(": ")[2].split(",")[0]  # e.g. "1.2 MB (30.1 KB per image and view)"
    number, unit = size_text.split()[:2]
    on_disk = cache.path.stat().st_size
    predicted = float(number) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    assert 0.9 * on_disk <= predicted <= on_disk  # the payload, the file adds only offsets and ids


def test_cache_modes_say_why_the_live_teacher_is_used(tiny_teacher, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = _cfg(tiny_teacher, tmp_path / "cache")
    cfg = cfg.updated({"data.pad_to": "batch", "distill.teacher_padding": "reference"})
    train_ds, _ = build_datasets(cfg)
    with pytest.raises(ConfigError, match=r"^distill.teacher_cache: on, but distill.teacher_padding: 'reference'"):
        prepare_teacher_cache(cfg, FrozenTeacher.load(tiny_teacher, padding="reference"), train_ds, torch.device("cpu"))
    cfg = cfg.updated({"distill.teacher_padding": "invariant"})
    teacher = FrozenTeacher.load(tiny_teacher)
    with pytest.raises(
        ConfigError, match=r"^distill.teacher_cache: on, but data.pad_multiple: 1 .* set data.pad_multiple=32$"
    ):
        prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    cfg = cfg.updated({"distill.teacher_cache": "auto", "data.pad_to": "max_size", "distill.logit.label_noise": 0.3})
    assert prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu")) is None
    assert "teacher cache not used: distill.logit.label_noise/box_noise" in caplog.text


def test_a_training_run_with_the_teacher_cache_learns_like_the_live_one(tiny_teacher, synth_data, tmp_path):
    from clockdistill.distill.run import run_distillation

    kd_logit = {}
    for mode in ("off", "on"):
        cfg = _cfg(tiny_teacher, tmp_path / "cache", teacher_cache=mode, logit={"random_queries": 2})
        cfg = cfg.updated({"train.epochs": 2, "train.output_dir": str(tmp_path / mode)})
        result = run_distillation(cfg)
        kd_logit[mode] = [h["loss_kd_logit"] for h in result.history]
    for live, cached in zip(kd_logit["off"], kd_logit["on"]):
        assert abs(live - cached) <= 0.02 * abs(live), kd_logit


def _build(path, log_path):
    def write(tmp):
        with open(log_path, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        Path(tmp).write_text("done")

    build_once(Path(path), write)


def test_build_once_builds_a_file_once_for_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build, args=(tmp_path / "c.arrow", tmp_path / "log")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert (tmp_path / "log").read_text() == "built\n"
    assert (tmp_path / "c.arrow").read_text() == "done"
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_failed_build_leaves_no_file(tmp_path):
    def write(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "c.arrow", write)
    assert not (tmp_path / "c.arrow").exists() and not list(tmp_path.glob("*.tmp*"))


def test_decoded_images_give_the_same_samples_without_opening_image_files(synth_data, tmp_path):

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    cfg = resolve_config(
        {
            "data": {"root": str(data), "train_sizes": [96, 128], "cache_dir": str(tmp_path / "cache")},
            "train": {"progress": False},
        }
    )
    plain_train, plain_val = build_datasets(cfg)
    cfg = cfg.updated({"data.decoded_cache": True})
    cached_train, cached_val = build_datasets(cfg)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.arrow"))) == 3  # train at 96 and 128, val at 128
    expected = {}
    for epoch in (0, 1):
        for ds_plain, ds_cached in ((plain_train, cached_train), (plain_val, cached_val)):
            ds_plain.set_epoch(epoch)
            for i in range(len(ds_plain)):
                expected[(id(ds_cached), epoch, i)] = ds_plain[i]
    shutil.rmtree(data / "images")  # from here on no image file can be read
    for (ds_id, epoch, i), (image, target) in expected.items():
        ds = cached_train if ds_id == id(cached_train) else cached_val
        ds.set_epoch(epoch)
        got_image, got_target = ds[i]
        assert torch.equal(got_image, image)
        assert torch.equal(got_target["boxes"], target["boxes"]) and got_target["view"] == target["view"]
    # DataLoader workers re-map the files in their own process
    loader = DataLoader(cached_train, batch_size=4, num_workers=2, collate_fn=collate)
    assert sum(len(t) for _, _, t in loader) == len(cached_train)
    with pytest.raises(DataError, match="missing image file"):  # the files are really gone
        plain_train[0]


def test_teacher_cache_file_is_reused(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path / "cache")
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    first = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    mtime = first.path.stat().st_mtime_ns
    second = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert isinstance(second, TeacherCache)
    cfg = cfg.updated({"distill.logit.groups": 1})  # a different query setting is a different file
    third = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    assert third.path != first.path


def test_a_sweep_builds_each_cache_once_and_reports_its_overhead(tiny_sweep):
    from mlflow.tracking import MlflowClient

    from conftest import tune_results

    cache = tiny_sweep["root"] / "cache"
    assert len(list((cache / "teacher").glob("*.arrow"))) == 1
    assert sorted(p.name.split("-")[0] for p in (cache / "decoded").glob("*.arrow")) == [
        "instances_train",
        "instances_val",
    ]
    trials = tune_results(tiny_sweep["storage"], "tiny")
    assert len(trials) == 4
    # built by the driver's per-node task before the first trial started (sweeps/tune/prebuild.py)
    first_start = min(rows[0]["timestamp"] - rows[0]["trial_wall_s"] for rows in trials.values())
    assert (
        next((cache / "teacher").glob("*.arrow")).stat().st_mtime <= first_start + 1.0
    )  # timestamps are whole seconds
    for rows in trials.values():
        assert rows[0]["startup_s"] > 0
        for r in rows:
            assert 0 <= r["trial_overhead_s"] <= r["trial_wall_s"]
            assert r["trial_wall_s"] >= r["train_time_s"] + r["eval_time_s"]
    # reused processes: a process's first trial pays imports and the cache builds, its later ones do not
    by_pid: dict[int, list] = {}
    for rows in sorted(trials.values(), key=lambda rows: rows[0]["timestamp"] - rows[0]["trial_wall_s"]):
        by_pid.setdefault(rows[0]["pid"], []).append(rows[0]["startup_s"])
    assert max(len(v) for v in by_pid.values()) >= 2, by_pid
    for startups in by_pid.values():
        assert all(later < startups[0] / 3 for later in startups[1:]), by_pid
    client = MlflowClient(tiny_sweep["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], S.trial_filter("tiny"))
    assert len(runs) == 4 and all("startup_s" in r.data.metrics and "trial_overhead_s" in r.data.metrics for r in runs)


def test_a_trial_does_not_wait_for_a_cache_another_process_builds(tiny_teacher, tmp_path):
    import fcntl

    from clockdistill.distill.cache import PendingTeacherCache, plan_cache

    cfg = _cfg(tiny_teacher, tmp_path / "cache", logit={"random_queries": 2})
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    plan = plan_cache(cfg, teacher, train_ds, torch.device("cpu"))
    plan.path.parent.mkdir(parents=True)
    with open(plan.path.with_name(plan.path.name + ".lock"), "a+") as held:  # "another process" is building it
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        pending = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"), wait=False)
        # never waits: the lock stays held, so a waiting call would hang; 60 s only bounds a busy machine
        assert isinstance(pending, PendingTeacherCache) and time.perf_counter() - t0 < 60
        assert build_once(plan.path, lambda tmp: None, wait=False) is None
        distiller = build_distiller(cfg, teacher, train_ds.num_classes, torch.device("cpu"))
        distiller.cache = pending
        images, mask, targets = next(iter(_loader(train_ds, cfg, 0)))
        live, _ = distiller.losses(images, mask, targets)  # served by the live teacher meanwhile
        assert distiller.cache is pending
    built = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))  # the other process finishes
    pending._next = 0.0  # do not wait out the poll interval in a test
    cached, _ = distiller.losses(images, mask, targets)
    assert isinstance(distiller.cache, TeacherCache) and distiller.cache.path == built.path
    for k in live:
        assert abs(live[k].item() - cached[k].item()) <= 2e-3 * abs(live[k].item()) + 1e-5, k


def test_decoded_files_being_built_elsewhere_are_picked_up_at_the_next_epoch(synth_data, tmp_path):
    import fcntl

    from clockdistill.data.decoded import decoded_path

    cfg = resolve_config(
        {
            "data": {"root": str(synth_data), "cache_dir": str(tmp_path / "cache"), "decoded_cache": True},
            "train": {"progress": False},
        }
    )
    probe, _ = build_datasets(resolve_config({"data": {"root": str(synth_data)}}))
    path = decoded_path(probe.index, 128, str(tmp_path / "cache"))
    path.parent.mkdir(parents=True)
    with open(path.with_name(path.name + ".lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        train, _ = build_datasets(cfg)
        assert train._decoded == {} and train._pending == {128: path}
        before = train[0]
    cfg = cfg.updated({"data.root": str(synth_data)})
    build_datasets(cfg)  # another trial builds the file now
    train.set_epoch(0)
    assert 128 in train._decoded and not train._pending
    after = train[0]
    assert torch.equal(before[0], after[0])


def test_every_epoch_gets_fresh_augmentation_in_loader_workers(synth_data):
    from clockdistill.engine import train_loader

    cfg = resolve_config({"data": {"root": str(synth_data), "num_workers": 1}, "train": {"batch_size": 4}})
    train, _ = build_datasets(cfg)
    g = torch.Generator()
    loader = train_loader(train, cfg, torch.device("cpu"), g)
    flips = []
    for epoch in range(3):
        train.set_epoch(epoch)
        g.manual_seed(0)  # the same order every epoch: only the augmentation may differ
        flips.append([t["view"] for _, _, targets in loader for t in targets])
    assert flips[0] != flips[1] or flips[1] != flips[2]


@pytest.mark.parametrize(
    "preset", ["deformable-detr-tiny-teacher-two-stage", "dab-detr-tiny-teacher", "dino-tiny-teacher"]
)
def test_the_teacher_cache_equals_the_live_teacher_on_the_faithful_detectors(synth_data, tmp_path, preset):
    """A two-stage teacher's own queries come from its proposals, a DAB-DETR teacher's from its
    anchors, a DINO teacher's from mixed query selection: their cached predictions (vanilla KD) and
    target-aware outputs equal the live ones (a DINO student's own denoising queries drawn alike)."""
    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.data.synth import CLASSES
    from clockdistill.models.build import build_detector

    torch.manual_seed(0)
    tcfg = resolve_config({"data": {"root": str(synth_data)}, "model": {"preset": preset, "num_classes": 4}})
    save_checkpoint(
        tmp_path / "teacher",
        build_detector(tcfg.model, 4),
        {"config": tcfg.to_dict(), "class_names": list(CLASSES)},
    )
    for method in ("clockdistill", "vanilla_kd"):
        cfg = _cfg(tmp_path / "teacher", tmp_path / "cache", method=method)
        train_ds, _ = build_datasets(cfg)
        teacher = FrozenTeacher.load(tmp_path / "teacher")
        distiller = build_distiller(cfg, teacher, train_ds.num_classes, torch.device("cpu"))
        cache = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
        _live_equals_cached(distiller, cache, next(iter(_loader(train_ds, cfg, 0))), (preset, method))


def test_the_teacher_cache_equals_the_live_teacher_across_architectures(tiny_teacher, tmp_path):
    """The hybrid teacher's cached memory (its own grid at the run's square canvas), paired by stride
    with the D-FINE student's levels like the live teacher's, and its cached target-aware outputs give
    the live losses."""
    cfg = resolve_config(
        distill=True,
        config={
            "model": {"preset": "dfine-tiny-student"},  # (its preset brings the square recipe)
            "data": {"hflip": 0.5, "cache_dir": str(tmp_path / "cache")},
            "train": {"device": "cpu", "progress": False, "batch_size": 4},
            "distill": {"teacher_cache": "on", "method": "clockdistill"},
        },
        teacher=tiny_teacher,
    )
    assert cfg.model.arch == "dfine" and cfg.data.resize == "square" and cfg.data.canvas == (128, 128)
    train_ds, _ = build_datasets(cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    distiller = build_distiller(cfg, teacher, train_ds.num_classes, torch.device("cpu"))
    assert distiller.pairing is not None
    cache = prepare_teacher_cache(cfg, teacher, train_ds, torch.device("cpu"))
    assert cache is not None
    live = _live_equals_cached(distiller, cache, next(iter(_loader(train_ds, cfg, 0))), "across architectures")
    kd = [k for k in live if k.startswith("kd_")]
    assert any(k.startswith("kd_mem") for k in kd) and any(live[k].item() > 1e-3 for k in kd)


def _live_equals_cached(distiller, cache, batch, what) -> dict:
    """The batch's losses with the live teacher and with the cache (the same random draws): every kd
    term equal (memory cached in fp16, decoder outputs in fp32). Returns the live ones."""
    images, mask, targets = batch
    distiller.cache = None
    torch.manual_seed(0)
    live, _ = distiller.losses(images, mask, targets)
    distiller.cache = cache
    torch.manual_seed(0)
    cached, _ = distiller.losses(images, mask, targets)
    for k in (k for k in live if k.startswith("kd_")):
        a, b = live[k].item(), cached[k].item()
        rtol, atol = (2e-3, 1e-5) if k.startswith("kd_mem") else (1e-4, 1e-6)
        assert abs(a - b) <= rtol * abs(a) + atol, (what, k, a, b)
    return live
