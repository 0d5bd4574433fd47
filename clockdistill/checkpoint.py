"""Checkpoints: a directory with safetensors tensors and a JSON of everything else. Never pickled.

<dir>/model.safetensors      model weights
<dir>/optimizer.safetensors  optimizer state tensors (optional)
<dir>/extra.safetensors      weights of trained helper modules, e.g. a distillation adapter (optional)
<dir>/meta.json              full config, epoch, metrics, scheduler and optimizer hyper-parameters
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.errors import UserError
from clockdistill.models.build import build_detector


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(pid), {})[key] = value
    return tensors, plain


def _optimizer_join(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in plain["state"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": plain["param_groups"]}


def _state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def damage(directory: str | Path) -> str | None:
    """Why the checkpoint in `directory` cannot be loaded (None: it is whole): meta.json missing or not
    JSON, or a tensor file whose header does not parse or whose data is shorter than the header says
    (a file cut short, as a power cut leaves it: safetensors refuses to open it)."""
    from safetensors import safe_open

    directory = Path(directory)
    try:
        json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json: {exc}"
    for f in sorted(directory.glob("*.safetensors")):
        try:  # opening checks the header and that the data covers every tensor it names
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
            return f"{f.name}: {exc}"
    return None


def _complete(directory: Path) -> bool:
    """meta.json is written last: a directory that has it holds a whole checkpoint."""
    return (directory / "meta.json").is_file()


def recover_checkpoint(path: str | Path) -> bool:
    """Finish a save that a crash interrupted, then say whether `path` holds a checkpoint.

    A save writes `<path>.tmp` completely, moves `<path>` aside to `<path>.old`, moves the new one
    in and deletes `.old`. A crash between the two moves leaves no `<path>`: then the new checkpoint
    (`.tmp`, if complete) or else the previous one (`.old`) becomes `<path>` again, so a save always
    leaves the old or the new checkpoint."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists():
        for candidate in (tmp, old):
            if _complete(candidate):
                os.replace(candidate, path)
                break
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    return _complete(path)


def epochs_done(output_dir: str | Path) -> int:
    """Epochs a training run in `output_dir` has finished (0 without a complete `last` checkpoint)."""
    last = Path(output_dir) / "last"
    return read_meta(last)["epoch"] + 1 if _complete(last) else 0


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, nn.Module] | None = None,
) -> Path:
    """Write atomically: at every moment the directory `path`, or after a crash `recover_checkpoint`,
    gives either the previous checkpoint or this one, complete."""
    path = Path(path)
    recover_checkpoint(path)  # an earlier save that was interrupted
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state(model), tmp / "model.safetensors")
    if extra:
        save_file(
            {k: v for name, m in extra.items() for k, v in _state(m, f"{name}.").items()}, tmp / "extra.safetensors"
        )
    meta = dict(meta)
    if optimizer is not None:
        tensors, plain = _optimizer_split(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        meta["optimizer"] = plain
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the directory complete
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def storage_filesystem(location: str):
    """(pyarrow filesystem, path) of a sweep storage location: a URI (s3://...) or a local path."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def load_weights(path: str | Path, model: nn.Module, device: str | torch.device = "cpu") -> None:
    weights_file = Path(path) / "model.safetensors"
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: checkpoint weights not found")
    try:
        state = load_file(weights_file, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{weights_file}: unreadable weights ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights_file}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> bool:
    opt_file = Path(path) / "optimizer.safetensors"
    if not opt_file.is_file() or "optimizer" not in meta:
        return False
    optimizer.load_state_dict(_optimizer_join(load_file(opt_file), meta["optimizer"]))
    return True


def load_extra(path: str | Path, modules: dict[str, nn.Module], device: str | torch.device = "cpu") -> None:
    """Load helper modules saved with `save_checkpoint(..., extra=)`."""
    if not modules:
        return
    extra_file = Path(path) / "extra.safetensors"
    if not extra_file.is_file():
        raise UserError(f"{extra_file}: not found (the checkpoint holds no {', '.join(modules)} weights)")
    state = load_file(extra_file, device=str(device))
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")})


def load_detector(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A detector in eval mode on `device` and its checkpoint metadata (config, class names, metrics)."""
    meta = read_meta(checkpoint)
    cfg = resolve_config(meta["config"])
    model = build_detector(cfg.model, cfg.model.num_classes or len(meta["class_names"]))
    load_weights(checkpoint, model, device)
    return model.to(device).eval(), meta
