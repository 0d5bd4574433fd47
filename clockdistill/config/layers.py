"""Every run's config comes from `resolve_config`, which layers the sources of its settings, each
winning over the ones above it:

    1. defaults        the dataclasses' own (sections.py, distill.py)
    2. architecture    the model preset that `model.preset` names in any layer below, with the loss
                       settings it brings (presets.py); when no layer names one: the starting
                       checkpoint's whole model section (`train.init_from`: fine-tuning keeps the
                       checkpoint's architecture), or, distilling, the student preset that follows
                       from the teacher's (hybrid-tiny-teacher -> hybrid-tiny-student); else the
                       default preset
    3. teacher         distilling: the teacher checkpoint's data section (same data set, sizes and
                       splits; not its input recipe, data.resize, which is the student's), its class
                       count and train.output_dir runs/distill, for keys the layers below leave out
    4. config          a YAML file's sections, or a dict of them (a sweep spec's `config` with the
                       spec's own data, student and epochs)
    5. variant         a sweep trial's variant: a named bundle of dotted keys
    6. overrides       a sweep trial's searched values, or `--set key=value` on the command line
    7. fixed           dotted keys the caller owns (a trial's output directory, resume, ...)

The `clockdistill train` and `distill` commands and every sweep trial call it; nothing else layers
settings. A teacher is read only to distil (`distill=True`); its path is `teacher` or
`distill.teacher` from the layers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.dotted import apply_overrides, build_dataclass, parse_yaml, set_dotted
from clockdistill.config.presets import preset_data_fields, preset_fields, preset_loss_fields, student_preset_for
from clockdistill.config.sections import Config, ModelConfig
from clockdistill.errors import ConfigError

SECTIONS = ("data", "model", "loss", "train", "distill")
# a starting checkpoint's model keys that are not its architecture: its class count (the new data's
# wins) and where its own backbone started from (its weights supersede that)
_NOT_ARCHITECTURE = ("num_classes", "backbone_weights")


def resolve_config(
    config: Mapping[str, Any] | str | Path | None = None,
    *,
    variant: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    fixed: Mapping[str, Any] | None = None,
    distill: bool = False,
    teacher: str | Path | None = None,
) -> Config:
    """The validated Config of a run from its sources, in the order of this module's docstring.

    `config` is a YAML file's path or a nested dict of sections (left as it is); `variant` and
    `fixed` map dotted keys to values; `overrides` maps dotted keys to values (a trial's searched
    values) or is a list of `key=value` strings (`--set`, values parsed as YAML). `distill` reads
    the teacher (`teacher`, else `distill.teacher`) for layers 2 and 3."""
    raw = read_config_file(config) if isinstance(config, (str, Path)) else copy.deepcopy(dict(config or {}))
    raw = _set_keys(raw, variant or {})
    if isinstance(overrides, Mapping):
        raw = _set_keys(raw, overrides)
    else:
        raw = apply_overrides(raw, list(overrides))
    raw = _set_keys(raw, fixed or {})
    if teacher is not None:
        raw = set_dotted(raw, "distill.teacher", str(teacher))
    for name in SECTIONS:
        if raw.get(name) is None:  # absent, or an empty YAML section
            raw[name] = {}
        if not isinstance(raw[name], dict):
            raise ConfigError(f"{name}: expected a mapping of keys to values, got {type(raw[name]).__name__}")
    start_model: dict[str, Any] = {}
    if distill:
        start_model = _teacher_layer(raw)
    elif raw["train"].get("init_from") and "preset" not in raw["model"]:  # (a saved config names its preset:
        start_model = _init_from_architecture(raw["train"]["init_from"])  # loading it reads no other file)
    return build_dataclass(Config, _architecture_layer(raw, start_model))


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file's contents as a dict ({} for no file), unvalidated."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loaded = parse_yaml(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return loaded or {}


def _set_keys(raw: dict[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in keys.items():
        raw = set_dotted(raw, key, value)
    return raw


def _teacher_layer(raw: dict[str, Any]) -> dict[str, Any]:
    """Layer 3 filled into `raw` (keys it leaves out); returns the student preset as layer 2's start."""
    path = raw["distill"].get("teacher")
    if not path:
        raise ConfigError(
            "distill.teacher: no teacher checkpoint given (--teacher CKPT, a directory from `clockdistill train`)"
        )
    meta = read_meta(path)
    for key, value in meta["config"]["data"].items():
        if key != "resize":  # the input recipe is the student's (its preset's): the teacher sees the student's batches
            raw["data"].setdefault(key, value)
    raw["model"].setdefault("num_classes", len(meta["class_names"]))
    raw["train"].setdefault("output_dir", "runs/distill")
    return {"preset": student_preset_for(meta["config"]["model"]["preset"])}


def _init_from_architecture(checkpoint: str) -> dict[str, Any]:
    """The starting checkpoint's model section without the keys that are not its architecture."""
    model = read_meta(checkpoint)["config"]["model"]
    return {k: v for k, v in model.items() if k not in _NOT_ARCHITECTURE}


def _architecture_layer(raw: dict[str, Any], start_model: dict[str, Any]) -> dict[str, Any]:
    """Layer 2 under the model and loss keys of `raw`: the named preset's fields, else `start_model`
    over its preset's fields, else the default preset's."""
    model = raw["model"]
    if "preset" in model:
        start_model = {}  # the user chose the architecture
    preset = model.get("preset", start_model.get("preset", ModelConfig.preset))
    raw["model"] = {**preset_fields(preset), **start_model, **model, "preset": preset}
    for section, defaults in (("loss", preset_loss_fields(preset)), ("data", preset_data_fields(preset))):
        if defaults:
            raw[section] = {**defaults, **raw[section]}
    return raw
