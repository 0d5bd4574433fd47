"""The sampled teacher cache (distill.teacher_cache_memory: sampled, distill/compact.py): the region
of the boxes in full, a reweighted background sample, fp16 or int8."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clockdistill.config.layers import resolve_config
from clockdistill.data.transforms import collate
from clockdistill.distill.compact import background_sample, dequantize, quantize, region_mask
from clockdistill.distill.losses import memory_terms
from clockdistill.distill.masks import memory_masks
from clockdistill.distill.run import build_distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.engine import build_datasets
from clockdistill.errors import ConfigError

GRID = [(12, 16), (6, 8), (3, 4)]
N = sum(h * w for h, w in GRID)


def _scene(seed: int):
    """An image's masks and squared errors on GRID: two boxes, the Gaussian mask, padding on the right."""
    g = torch.Generator().manual_seed(seed)
    target = {"boxes": torch.tensor([[0.3, 0.4, 0.1, 0.12], [0.7, 0.6, 0.08, 0.1]]), "size": torch.tensor([96, 128])}
    pad = torch.zeros(1, N, dtype=torch.bool)
    pad[0, 15:192:16] = True  # the last column of level 0
    m, s = memory_masks([target], (96, 128), GRID, pad, "gaussian", 2.0, True)
    t, st = torch.randn(1, N, 8, generator=g), torch.randn(1, N, 8, generator=g)
    region = region_mask(target, GRID, (8, 16, 32), 3.0, (96, 128), pad[0])
    return m, s, t, st, region, ~pad[0]


def _weights(region, valid, k: int, key) -> torch.Tensor:
    idx, w = background_sample(region.numpy(), valid.numpy(), GRID, k, key)
    out = torch.zeros(1, N)
    out[0, torch.from_numpy(idx).long()] = torch.from_numpy(w)
    return out


def test_the_region_holds_every_masked_token():
    m, _, _, _, region, _ = _scene(0)
    assert bool(region[m[0] > 0].all())  # M > 0 (Gaussian, grow 2) inside the stored region (grow 3)
    assert 0 < int(region.sum()) < N // 2


def test_the_background_estimate_is_exact_in_expectation_and_with_every_token():
    m, s, t, st, region, valid = _scene(0)
    exact = memory_terms(t, st, m, s)
    full = memory_terms(t, st, m, s, token_weight=_weights(region, valid, 10_000, (1, 128, 0)))
    for k in ("kd_mem_fg", "kd_mem_bg"):
        assert torch.isclose(full[k], exact[k], rtol=1e-6), k
    draws = [memory_terms(t, st, m, s, token_weight=_weights(region, valid, 12, (1, 128, d))) for d in range(2000)]
    fg = torch.stack([d["kd_mem_fg"] for d in draws])
    bg = torch.stack([d["kd_mem_bg"] for d in draws])
    assert torch.allclose(fg, exact["kd_mem_fg"].expand_as(fg), rtol=1e-6)  # the region is stored in full
    assert bg.std() > 0.01 * exact["kd_mem_bg"]  # each draw is an estimate...
    # ...whose mean is the exact term: within 4 standard errors (measured: 0.3 of one over seeds 0-4)
    assert abs(bg.mean() - exact["kd_mem_bg"]) < 4 * bg.std() / len(draws) ** 0.5


def test_a_sample_is_fixed_by_its_image_and_view():
    _, _, _, _, region, valid = _scene(0)
    a = background_sample(region.numpy(), valid.numpy(), GRID, 12, (7, 128, 0))
    b = background_sample(region.numpy(), valid.numpy(), GRID, 12, (7, 128, 0))
    c = background_sample(region.numpy(), valid.numpy(), GRID, 12, (7, 128, 1))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert (np.diff(a[0]) > 0).all()  # sorted, no token twice


def test_int8_rounds_within_half_a_step_of_each_channel():
    x = torch.randn(50, 16) * torch.logspace(-2, 2, 16)
    raw, scales = quantize(x, "int8")
    y = dequantize(np.frombuffer(raw, np.int8), np.frombuffer(scales, np.float32), 16)
    step = x.abs().amax(0) / 127
    assert ((torch.from_numpy(y) - x).abs() <= step / 2 + 1e-7).all()


def _cfg(teacher, cache_dir, data, **distill):
    return resolve_config(
        distill=True,
        config={
            "data": {**data, "train_sizes": [96, 128], "hflip": 0.5, "cache_dir": str(cache_dir)},
            "train": {"device": "cpu", "progress": False, "batch_size": 4},
            "distill": {"teacher_cache": "on", "teacher_cache_memory": "sampled", **distill},
        },
        teacher=teacher,
    )


@pytest.mark.parametrize(
    "data", [{"pad_to": "max_size"}, {"pad_to": "batch", "pad_multiple": 32}], ids=["canvas", "per_image"]
)
@pytest.mark.parametrize("method", ["clockdistill", "fitnet"])
def test_a_sampled_cache_gives_the_live_losses(tiny_teacher, tmp_path, data, method):
    """With a sample as large as the background: the live terms (fp16 rounding). With 8 tokens: the
    foreground term still; the background an estimate. int8: within its rounding."""
    live_cfg = _cfg(tiny_teacher, tmp_path / "c0", data, method=method, teacher_cache_background=100_000)
    train_ds, _ = build_datasets(live_cfg)
    teacher = FrozenTeacher.load(tiny_teacher)
    distiller = build_distiller(live_cfg, teacher, train_ds.num_classes, torch.device("cpu"))
    from clockdistill.distill.cache import prepare_teacher_cache

    caches = {
        name: prepare_teacher_cache(_cfg(tiny_teacher, tmp_path / name, data, method=method, **keys), teacher, train_ds,
                                    torch.device("cpu"))
        for name, keys in {
            "all": {"teacher_cache_background": 100_000},
            "few": {"teacher_cache_background": 8},
            "int8": {"teacher_cache_background": 100_000, "teacher_cache_dtype": "int8"},
        }.items()
    }  # fmt: skip
    assert all(c is not None and c.sampled for c in caches.values())
    sizes = {name: c.path.stat().st_size for name, c in caches.items()}
    assert sizes["few"] < sizes["all"] and sizes["int8"] < sizes["all"]  # (the decoder outputs are the same)
    train_ds.set_epoch(0)
    loader = DataLoader(
        train_ds, batch_size=4, collate_fn=lambda b: collate(b, pad_to=live_cfg.data.canvas, multiple=32)
    )
    compared = 0
    for images, mask, targets in loader:
        distiller.cache = None
        live, _ = distiller.losses(images, mask, targets)
        for name, cache in caches.items():
            distiller.cache = cache
            cached, _ = distiller.losses(images, mask, targets)
            for k in [k for k in live if k.startswith(("kd_mem", "kd_fitnet"))]:
                a, b = live[k].item(), cached[k].item()
                if name == "few" and k != "kd_mem_fg":
                    assert b > 0 and np.isfinite(b), (name, k)
                    continue
                rtol = 2e-2 if name == "int8" else 2e-3
                assert abs(a - b) <= rtol * abs(a) + 1e-6, (name, k, a, b)
                compared += 1
    assert compared > 0


def test_a_sampled_cache_refuses_a_mask_larger_than_its_region(tiny_teacher, tmp_path):
    cfg = _cfg(
        tiny_teacher,
        tmp_path / "c",
        {"pad_to": "max_size"},
        teacher_cache_region_grow=2.0,
        memory={"mask": "gaussian", "gaussian_grow": 2.5},
    )
    train_ds, _ = build_datasets(cfg)
    from clockdistill.distill.cache import prepare_teacher_cache

    with pytest.raises(ConfigError, match=r"^distill.teacher_cache: on, but distill.memory.gaussian_grow: 2.5 reaches"):
        prepare_teacher_cache(cfg, FrozenTeacher.load(tiny_teacher), train_ds, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^distill.teacher_cache_dtype: int8 needs distill.teacher_cache_memory"):
        resolve_config({"distill": {"teacher_cache_dtype": "int8"}})
