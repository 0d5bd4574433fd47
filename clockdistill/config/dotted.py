"""Config plumbing shared by every config dataclass: YAML parsing (floats like `5e-5` included),
typed construction of nested dataclasses from dicts, dotted keys and `--set key=value` overrides,
and the one-line range/choice checks the dataclasses run in `__post_init__`."""

import copy
import dataclasses
import re
import typing
from typing import Any

import yaml

from clockdistill.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """safe_load that also reads `5e-5` as a float (YAML 1.1 wants `5.0e-5`), and whose booleans are
    YAML 1.2's (true / false): `on`, `off`, `yes` and `no` stay strings, so a knob whose values are
    on / off / auto (distill.teacher_cache) reads as written; a true/false field takes them as well
    (_coerce)."""


BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
BOOL_WORDS = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    loader = _Loader(text)  # a SafeLoader: tags that construct Python objects are refused
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Construct dataclass `cls` from a nested dict, checking keys and value types."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, dotted)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_coerce(item_tp, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, dotted)


def _coerce_scalar(tp: Any, value: Any, dotted: str) -> Any:
    if tp is bool:
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp} for {dotted}")


def check_choice(dotted: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{dotted}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def check_range(dotted: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{dotted}: expected a value {bounds}, got {value!r}")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of nested dict `data` with dotted `key` set to `value` (`data` is left as it is)."""
    out = copy.deepcopy(data)
    parts = key.strip().split(".")
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
    node[parts[-1]] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of nested dict `data` with `a.b=value` strings applied (values parsed as YAML scalars
    or lists); `data` itself is left as it is."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            out = set_dotted(out, key, parse_yaml(raw) if raw.strip() else "")
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
    return out
