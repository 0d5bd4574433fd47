"""Importing an original repository's model and loss modules from a clone, for the parity benchmarks
(parity_dfine.py, parity_rtdetr.py), without running its package __init__ files (which pull its data
pipeline, solvers and their dependencies): its packages are registered as empty modules over their
folders, its registry decorator as the identity, its distributed helpers as one process, and
torchvision's box_area (a CUDA build on PyPI; not a dependency of this project) as a one-line
function. The original code is imported from the given directory and never copied."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch


def _module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load(src: Path, modules: list[str]) -> dict[str, types.ModuleType]:
    """`src` is the repository's `src` folder; `modules` dotted names under it (zoo.rtdetr.hybrid_encoder)."""
    for name in [k for k in sys.modules if k == "src" or k.startswith("src.")]:
        del sys.modules[name]  # (one repository at a time: both name their package `src`)
    _module("src", src)

    def register(*args, **kwargs):  # `@register` and `@register()`
        return args[0] if len(args) == 1 and isinstance(args[0], type) else (lambda cls: cls)

    _module("src.core", src / "core", register=register)
    _module("src.misc", src / "misc")
    one = dict(get_world_size=lambda: 1, is_dist_available_and_initialized=lambda: False)
    _module("src.misc.dist", **one)
    _module("src.misc.dist_utils", **one)
    for name in {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}:
        _module(f"src.{name}", src / name.replace(".", "/"))
    tv = _module("torchvision", Path("."))
    tv.ops = _module("torchvision.ops", Path("."))
    _module("torchvision.ops.boxes", box_area=lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return {m: importlib.import_module(f"src.{m}") for m in modules}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor away from its initial value (zero-initialised layers would hide a mapping error),
    BatchNorm variances positive; constants (points scales, D-FINE's up and reg_scale) kept."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith(("num_points_scale", "decoder.up", "reg_scale")) or not t.is_floating_point():
                continue
            else:
                t.add_(torch.randn_like(t) * (0.1 if t.dim() == 1 else 0.05))
    return model


def no_batch_statistics(model: torch.nn.Module) -> None:
    """Training mode (every layer's outputs) with BatchNorm reading its running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def run_both(ref: torch.nn.Module, ours: torch.nn.Module, cfg, size: int = 128):
    """Both models on one seeded 2-image batch with three boxes, in training mode with BatchNorm in
    evaluation and no denoising queries (the reference draws them at random): (theirs, ours, targets)."""
    ref.decoder.num_denoising = 0
    ours.cfg = cfg.model.__class__(**{**cfg.model.__dict__, "dn_number": 0})
    no_batch_statistics(ref)
    no_batch_statistics(ours)
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return ref(images, targets=targets), ours(images, mask, targets=targets), targets
