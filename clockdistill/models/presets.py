"""Named detector presets. A preset fills every ModelConfig field; a config may override any of them.

teacher / student are the full-size pair (d_model 256, so memories line up without an adapter);
tiny-teacher / tiny-student run on a CPU in minutes, for tests and the demo. `-dab` variants use the
single-scale DAB-style detector instead of Deformable DETR.
"""

from __future__ import annotations

from typing import Any

from clockdistill.errors import ConfigError

_DEFORMABLE: dict[str, dict[str, Any]] = {
    "teacher": dict(
        backbone_depth=50,
        backbone_width=1.0,
        d_model=256,
        nheads=8,
        enc_layers=6,
        dec_layers=6,
        ffn_dim=1024,
        num_queries=300,
        num_levels=4,
        n_points=4,
        dropout=0.1,
    ),
    "student": dict(
        backbone_depth=18,
        backbone_width=1.0,
        d_model=256,
        nheads=8,
        enc_layers=3,
        dec_layers=6,
        ffn_dim=1024,
        num_queries=300,
        num_levels=4,
        n_points=4,
        dropout=0.1,
    ),
    "tiny-teacher": dict(
        backbone_depth=18,
        backbone_width=0.25,
        d_model=64,
        nheads=4,
        enc_layers=2,
        dec_layers=3,
        ffn_dim=256,
        num_queries=30,
        num_levels=3,
        n_points=4,
        dropout=0.0,
    ),
    "tiny-student": dict(
        backbone_depth=18,
        backbone_width=0.125,
        d_model=64,
        nheads=4,
        enc_layers=1,
        dec_layers=3,
        ffn_dim=128,
        num_queries=30,
        num_levels=3,
        n_points=4,
        dropout=0.0,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {}
for _name, _fields in _DEFORMABLE.items():
    PRESETS[_name] = {"arch": "deformable", **_fields}
    _dab = {k: v for k, v in _fields.items() if k not in ("num_levels", "n_points")}
    PRESETS[f"{_name}-dab"] = {"arch": "dab", "feature_stride": 32 if _name in ("teacher", "student") else 16, **_dab}


def preset_fields(name: str) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return dict(PRESETS[name])
