"""Named detector presets. A preset fills every ModelConfig field; a config may override any of them.

Presets named after a paper detector are that detector as its reference implementation builds it
(the published checkpoints load into them), at the sizes distillation papers pair:

    deformable-detr-{r18,r50,r101}[-refine|-two-stage]   Deformable DETR: 4 levels, 6/6 layers, d 256,
                                                         300 queries, frozen-BN ResNet (stem+layer1 frozen)
    dab-detr-{r18,r50,r101}[-dc5]                        DAB-DETR: single scale, 6/6 layers, d 256, PReLU
    dino-{r18,r50,r101}[-5scale]                         DINO 4-scale (C3-C5 + one strided level) or
                                                         5-scale (C2-C5 + one): 6/6 layers, d 256, 900
                                                         queries, denoising budget 100 (box noise 0.4,
                                                         labels 0.5)
    *-tiny-teacher, *-tiny-student                       the same architectures at CPU size (ResNet-18
                                                         x0.25 / x0.125, d 64, trainable BatchNorm), for
                                                         tests, the demo and CPU benchmarks

Real-time DETRs, as their reference implementations build them:

    rtdetr-r{18,34,50,101}, rtdetrv2-r{18,34,50,101}[-dsp]   RT-DETR, RT-DETRv2 (models/rtdetr.py)
    dfine-{n,s,m,l,x}                                      D-FINE on HGNetV2 B0 / B0 / B2 / B4 / B5
                                                           (models/dfine.py)

`hybrid-*` are this project's own DETR (models/hybrid.py), which trains fast from scratch.
`student_preset_for` gives the student a teacher preset is usually distilled into.
"""

from __future__ import annotations

from typing import Any

from clockdistill.errors import ConfigError

_REFERENCE_BACKBONE = dict(backbone_width=1.0, backbone_norm="frozen", backbone_frozen_stages=1)
_TINY_BACKBONE = dict(backbone_depth=18, backbone_norm="batch", backbone_frozen_stages=0, dropout=0.0)
_TINY = {  # teacher / student sizes shared by every tiny architecture
    "teacher": dict(
        _TINY_BACKBONE,
        backbone_width=0.25,
        d_model=64,
        nheads=4,
        enc_layers=2,
        dec_layers=3,
        ffn_dim=256,
        num_queries=30,
    ),
    "student": dict(
        _TINY_BACKBONE,
        backbone_width=0.125,
        d_model=64,
        nheads=4,
        enc_layers=1,
        dec_layers=3,
        ffn_dim=128,
        num_queries=30,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {}
_STUDENTS: dict[str, str] = {}  # teacher preset -> its usual student

_DEFORMABLE = dict(
    arch="deformable",
    d_model=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    ffn_dim=1024,
    dropout=0.1,
    num_queries=300,
    num_levels=4,
    n_points=4,
    dilation=False,
)
_DAB = dict(
    arch="dab",
    d_model=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    ffn_dim=2048,
    dropout=0.0,
    num_queries=300,
    num_levels=1,
    n_points=4,
)
_DINO = dict(  # DINO-4scale: Deformable DETR's sizes but a 2048-wide FFN, no dropout, 900 queries, denoising
    _DEFORMABLE,
    arch="dino",
    ffn_dim=2048,
    dropout=0.0,
    num_queries=900,
    dn_number=100,
    dn_box_noise=0.4,
    dn_label_noise=0.5,
)
# a tiny DINO's denoising budget: 3 -> 6 groups (the reference's 100 gives ~200 denoising slots on a
# batch of 5 boxes, seven times the 30 matching queries)
_DINO_TINY = dict(dn_number=3, num_queries=30)
_VARIANTS = {"": {}, "-refine": {"box_refine": True}, "-two-stage": {"box_refine": True, "two_stage": True}}

for _depth in (18, 50, 101):
    for _suffix, _variant in _VARIANTS.items():
        PRESETS[f"deformable-detr-r{_depth}{_suffix}"] = {
            **_DEFORMABLE,
            **_REFERENCE_BACKBONE,
            "backbone_depth": _depth,
            **_variant,
        }
        PRESETS[f"deformable-detr-tiny-teacher{_suffix}"] = {**_DEFORMABLE, **_TINY["teacher"], **_variant}
        PRESETS[f"deformable-detr-tiny-student{_suffix}"] = {**_DEFORMABLE, **_TINY["student"], **_variant}
    for _suffix, _dilation in (("", False), ("-dc5", True)):
        PRESETS[f"dab-detr-r{_depth}{_suffix}"] = {
            **_DAB,
            **_REFERENCE_BACKBONE,
            "backbone_depth": _depth,
            "dilation": _dilation,
        }
    PRESETS[f"dino-r{_depth}"] = {**_DINO, **_REFERENCE_BACKBONE, "backbone_depth": _depth}
    PRESETS[f"dino-r{_depth}-5scale"] = {**PRESETS[f"dino-r{_depth}"], "num_levels": 5, "backbone_levels": 4}
for _size in ("teacher", "student"):  # C5 of a 128-pixel image is 4 x 4 cells: the tiny DAB dilates (DC5)
    PRESETS[f"dab-detr-tiny-{_size}"] = {**_DAB, **_TINY[_size], "dilation": True}
    PRESETS[f"dino-tiny-{_size}"] = {**_DINO, **_TINY[_size], **_DINO_TINY}

# RT-DETR (lyuwenyu/RT-DETR, rtdetr_pytorch/configs/rtdetr): PResNet-vd, the hybrid encoder (one AIFI layer on
# C5, CSPRep layers of 3 RepVGG blocks), 300 queries, 100 denoising queries with box noise 1.0; R18 / R34
# train their BatchNorm and every stage, R50 / R101 freeze the norm and the stem; R101's encoder is 384 wide
_RTDETR = dict(
    arch="rtdetr",
    backbone_norm="batch",
    backbone_frozen_stages=0,
    d_model=256,
    nheads=8,
    enc_layers=1,
    ffn_dim=1024,
    dropout=0.0,
    num_queries=300,
    num_levels=3,
    n_points=4,
    dn_number=100,
    dn_box_noise=1.0,
    dn_label_noise=0.5,
    frozen_bn=False,
)
for _depth, _layers, _extra in (
    (18, 3, dict(expansion=0.5)),
    (34, 4, dict(expansion=0.5)),
    (50, 6, dict(backbone_norm="frozen", backbone_frozen_stages=1)),
    (101, 6, dict(backbone_norm="frozen", backbone_frozen_stages=1, encoder_dim=384, encoder_ffn_dim=2048)),
):
    PRESETS[f"rtdetr-r{_depth}"] = dict(
        _RTDETR, backbone_depth=_depth, backbone_width=1.0, dec_layers=_layers, **_extra
    )  # fmt: skip
# RT-DETRv2 (rtdetrv2_pytorch/configs/rtdetrv2): the same models with the v2 decoder attention at its
# published setting (4 points on each of the 3 levels, bilinear sampling); `-dsp`: discrete sampling
for _depth in (18, 34, 50, 101):
    PRESETS[f"rtdetrv2-r{_depth}"] = dict(PRESETS[f"rtdetr-r{_depth}"], rtdetr_version=2, level_points=[4, 4, 4])
    PRESETS[f"rtdetrv2-r{_depth}-dsp"] = dict(PRESETS[f"rtdetrv2-r{_depth}"], cross_attn_method="discrete")
# tiny: the tiny sizes (ResNet-18-vd at 1/4 or 1/8 width), one RepVGG block per CSPRep layer, 30 queries and
# a denoising budget of 12 queries per box of the batch's fullest image
for _size in ("teacher", "student"):
    PRESETS[f"rtdetr-tiny-{_size}"] = dict(
        _RTDETR, **{k: v for k, v in _TINY[_size].items() if k != "enc_layers"}, enc_layers=1, expansion=0.5,
        depth_mult=1 / 3, dn_number=12,
    )  # fmt: skip
# D-FINE (Peterande/D-FINE, configs/dfine): HGNetV2 backbones (B0 / B2 with learnable affine blocks, their
# BatchNorm trained; B4 / B5 frozen, the stem too), RT-DETR's encoder with D-FINE's blocks, 300 queries,
# 100 denoising queries, decoder points [3, 6, 3] per level, 32 bins; N reads two levels (strides 16, 32)
_DFINE = dict(
    _RTDETR, arch="dfine", backbone_width=1.0, level_points=[3, 6, 3], reg_max=32, reg_scale=4.0, expansion=1.0,
    depth_mult=1.0,
)  # fmt: skip
PRESETS["dfine-n"] = dict(
    _DFINE, hgnet="B0", use_lab=True, num_levels=2, level_points=[6, 6], d_model=128, ffn_dim=512, encoder_ffn_dim=512,
    expansion=0.34, depth_mult=0.5, dec_layers=3,
)  # fmt: skip
PRESETS["dfine-s"] = dict(_DFINE, hgnet="B0", use_lab=True, expansion=0.5, depth_mult=0.34, dec_layers=3)
PRESETS["dfine-m"] = dict(_DFINE, hgnet="B2", use_lab=True, depth_mult=0.67, dec_layers=4)
PRESETS["dfine-l"] = dict(_DFINE, hgnet="B4", backbone_norm="frozen", backbone_frozen_stages=1, dec_layers=6)
PRESETS["dfine-x"] = dict(
    _DFINE, hgnet="B5", backbone_norm="frozen", backbone_frozen_stages=1, encoder_dim=384, encoder_ffn_dim=2048,
    dec_layers=6, reg_scale=8.0,
)  # fmt: skip
# tiny: B0 at the tiny sizes' width (1/4 teacher, 1/8 student) and decoder, one RepVGG block per CSP layer,
# 4 points per level and a denoising budget of 12 queries per box of the batch's fullest image
for _size in ("teacher", "student"):
    PRESETS[f"dfine-tiny-{_size}"] = dict(
        _DFINE, **{k: v for k, v in _TINY[_size].items() if k not in ("enc_layers", "backbone_depth")}, enc_layers=1,
        hgnet="B0", use_lab=True, expansion=0.5, depth_mult=1 / 3, dn_number=12, level_points=[],
    )  # fmt: skip
# data settings a preset brings (a config's own data keys win): RT-DETR's and D-FINE's fixed square inputs
PRESET_DATA: dict[str, dict[str, Any]] = {n: {"resize": "square"} for n in PRESETS if n.startswith(("rtdetr", "dfine"))}
# loss settings a preset brings (a config's own loss keys win): DINO's published class weight is 1; RT-DETR's
# classification loss is varifocal at weight 1
PRESET_LOSS: dict[str, dict[str, Any]] = {name: {"cls": 1.0} for name in PRESETS if name.startswith("dino-")}
PRESET_LOSS.update({name: {"cls": 1.0, "cls_loss": "vfl"} for name in PRESETS if name.startswith(("rtdetr", "dfine"))})

_HYBRID = dict(arch="hybrid", backbone_norm="batch", backbone_frozen_stages=0, dilation=False, n_points=4)
PRESETS["hybrid-teacher"] = dict(
    _HYBRID,
    backbone_depth=50,
    backbone_width=1.0,
    d_model=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    ffn_dim=1024,
    num_queries=300,
    num_levels=4,
    dropout=0.1,
)
PRESETS["hybrid-student"] = dict(PRESETS["hybrid-teacher"], backbone_depth=18, enc_layers=3)
PRESETS["hybrid-tiny-teacher"] = dict(_HYBRID, **_TINY["teacher"], num_levels=3)
PRESETS["hybrid-tiny-student"] = dict(_HYBRID, **_TINY["student"], num_levels=3)

for _name in PRESETS:
    if "teacher" in _name:
        _STUDENTS[_name] = _name.replace("teacher", "student")
    for _big, _small in (("r101", "r50"), ("r50", "r18")):
        if f"-{_big}" in _name:
            _STUDENTS[_name] = _name.replace(f"-{_big}", f"-{_small}")
for _big, _small in (("x", "l"), ("l", "m"), ("m", "s"), ("s", "n")):  # D-FINE: one size down
    _STUDENTS[f"dfine-{_big}"] = f"dfine-{_small}"


def preset_fields(name: str) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return dict(PRESETS[name])


def preset_loss_fields(name: str) -> dict[str, Any]:
    """The loss settings that come with a preset (empty for most)."""
    return dict(PRESET_LOSS.get(name, {}))


def preset_data_fields(name: str) -> dict[str, Any]:
    """The data settings that come with a preset (empty for most)."""
    return dict(PRESET_DATA.get(name, {}))


def student_preset_for(teacher_preset: str) -> str:
    """The student preset a teacher preset is usually distilled into; a teacher preset without one
    is a one-line error asking for model.preset."""
    name = _STUDENTS.get(teacher_preset)
    if name is None:
        raise ConfigError(
            f"model.preset: no student preset given, and none follows from the teacher's preset {teacher_preset!r} "
            "(set model.preset)"
        )
    return name
