"""Reading weight files safely: safetensors, or torch pickles through `torch.load(weights_only=True)`
(PyTorch's restricted unpickler: tensors and plain containers; the reference repositories'
checkpoints also carry their argparse Namespace, which is allowed as the plain record it is).
Anything else is refused with one line."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from clockdistill.errors import UserError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_checkpoint(path: str | Path, field: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, everything else the file holds): a safetensors file, a torch pickle (the state
    dict itself, or under `model` / `state_dict` as the reference repositories save it), or a
    Hugging Face model directory (its model.safetensors, and config.json as `config`). A trainer's
    checkpoint with an EMA copy (`{"ema": {"module": state}}`) gives the EMA weights."""
    path = Path(path)
    if path.is_dir():
        return _read_model_directory(path, field)
    if not path.is_file():
        raise UserError(f"{field}: {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path), {}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{field}: {path} is not a readable safetensors file ({exc})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"{field}: {path}: expected a .safetensors or {'/'.join(PICKLE_SUFFIXES)} file, or a model directory"
        )
    obj = _load_pickle(path, field)
    if isinstance(obj, dict):
        ema = obj.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("module"), dict) and _is_state(ema["module"]):
            # RT-DETR's and D-FINE's trainers: the EMA weights, the ones they evaluate and publish
            return ema["module"], {k: v for k, v in obj.items() if k not in ("ema", "model")}
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict) and _is_state(obj[key]):
                return obj[key], {k: v for k, v in obj.items() if k != key}
        if _is_state(obj):
            return obj, {}
    raise UserError(
        f"{field}: {path} holds no state dict (expected a mapping of names to tensors, or one under 'model')"
    )


def _read_model_directory(path: Path, field: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state, extras = read_checkpoint(path / name, field)
            if (path / "config.json").is_file():
                extras["config"] = json.loads((path / "config.json").read_text())
            return state, extras
    raise UserError(f"{field}: {path} holds no model.safetensors or pytorch_model.bin")


def _load_pickle(path: Path, field: str) -> Any:
    """A torch pickle through the weights-only loader (the reference checkpoints' args allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # readable, but holds an object the restricted unpickler refuses
        raise UserError(
            f"{field}: {path} is not a plain state dict (refused by the weights-only loader: {first_words(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError... for a bad file
        raise UserError(
            f"{field}: {path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}: {first_words(exc)})"
        ) from None


def first_words(exc: BaseException, limit: int = 100) -> str:
    """The first line of an exception's message, cut at a word boundary (its type when it has none)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _is_state(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_state_dict(path: str | Path, field: str = "checkpoint") -> dict[str, Tensor]:
    return read_checkpoint(path, field)[0]
