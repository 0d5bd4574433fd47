"""A checkpoint directory's meta.json: its full config, class names, epoch and metrics (checkpoint.py
writes it last, so its presence marks a complete checkpoint). Read without torch: the config
layering reads a teacher's or a starting checkpoint's settings from here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clockdistill.errors import UserError


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"{path}: not a checkpoint (expected a directory with meta.json and model.safetensors)")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_file}: corrupt checkpoint metadata ({exc})") from None
