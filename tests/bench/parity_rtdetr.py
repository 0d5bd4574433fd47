"""Benchmark: our RT-DETR and RT-DETRv2 (model and loss) against the original repository's own code, on the CPU.

    git clone https://github.com/lyuwenyu/RT-DETR /src/RT-DETR
    python tests/bench/parity_rtdetr.py --rtdetr /src/RT-DETR [--manifest-dir tests/data]

The tests compare our RT-DETR with transformers' ports (tests/test_rtdetr.py); this compares it with
the code the published checkpoints were trained with (rtdetr_pytorch for v1, rtdetrv2_pytorch for v2,
both sampling methods). Our model at a small size on the full-width ResNet-18-vd (the reference builds
only the standard widths), every tensor perturbed, is loaded into the reference model with strict=True
under the reference's names (`original_names`: v2's query-selection projection is `enc_output.proj` /
`.norm` there), and both run on a 2-image batch in training mode (BatchNorm in evaluation, no
denoising queries: the reference draws them at random): every decoder layer's logits and boxes and
the selected proposals'. Then the reference's criterion (its HungarianMatcher, VFL and boxes at the
published weights) on its outputs against ours on ours: every term and the weighted total.

`--manifest-dir DIR` writes the reference's key/shape manifests (rtdetr_reference_keys.json,
rtdetrv2_reference_keys.json) at this size, which the import test checks against.

How the original runs here: tests/bench/reference_code.py. The original code is imported from the given
directory and never copied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench: the reference loader

from reference_code import load, perturbed, run_both  # noqa: E402

from clockdistill.config.layers import resolve_config  # noqa: E402
from clockdistill.losses.criterion import SetCriterion, model_detection_weights  # noqa: E402
from clockdistill.models.build import build_detector  # noqa: E402
from clockdistill.weights.layouts import original_names  # noqa: E402

SMALL = dict(  # on top of the presets rtdetr-r18 / rtdetrv2-r18: the full-width R18-vd, a small encoder and decoder
    d_model=64, nheads=4, ffn_dim=128, encoder_ffn_dim=128, dec_layers=3, num_queries=20, dn_number=10,
)  # fmt: skip
VERSIONS = {  # name: (repository folder, decoder module, our preset and fields)
    "v1": ("rtdetr_pytorch", "rtdetr_decoder", {"preset": "rtdetr-r18"}),
    "v2": ("rtdetrv2_pytorch", "rtdetrv2_decoder", {"preset": "rtdetrv2-r18", "level_points": [4, 4, 4]}),
    "v2-discrete": (
        "rtdetrv2_pytorch",
        "rtdetrv2_decoder",
        {"preset": "rtdetrv2-r18", "level_points": [4, 4, 4], "cross_attn_method": "discrete"},
    ),
}
SIZE = 128


def build_reference(mods: dict, version: str, m, num_classes: int):
    backbone = mods["nn.backbone.presnet"].PResNet(18, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False)
    encoder = mods["zoo.rtdetr.hybrid_encoder"].HybridEncoder(
        in_channels=[128, 256, 512], hidden_dim=m.d_model, nhead=m.nheads, dim_feedforward=m.encoder_ffn_dim,
        expansion=m.expansion, depth_mult=m.depth_mult,
    )  # fmt: skip
    common = dict(
        num_classes=num_classes, hidden_dim=m.d_model, num_queries=m.num_queries, feat_channels=[m.d_model] * 3,
        num_levels=3, nhead=m.nheads, dim_feedforward=m.ffn_dim, num_denoising=m.dn_number,
    )  # fmt: skip
    if version == "v1":
        decoder = mods["zoo.rtdetr.rtdetr_decoder"].RTDETRTransformer(
            num_decoder_points=m.n_points, num_decoder_layers=m.dec_layers, **common
        )
    else:
        decoder = mods["zoo.rtdetr.rtdetrv2_decoder"].RTDETRTransformerv2(
            num_points=list(m.level_points), num_layers=m.dec_layers, cross_attn_method=m.cross_attn_method, **common
        )
    return mods["zoo.rtdetr.rtdetr"].RTDETR(backbone, encoder, decoder)


def compare(version: str, root: Path, manifest_dir: Path | None) -> None:
    folder, decoder, fields = VERSIONS[version]
    names = ["nn.backbone.presnet", "zoo.rtdetr.hybrid_encoder", f"zoo.rtdetr.{decoder}", "zoo.rtdetr.matcher"]
    names += [
        "zoo.rtdetr.rtdetr",
        "zoo.rtdetr.rtdetr_criterion" if version == "v1" else "zoo.rtdetr.rtdetrv2_criterion",
    ]
    mods = load(root / folder / "src", names)
    torch.manual_seed(0)
    cfg = resolve_config({"model": {**fields, **SMALL}})
    ours = perturbed(build_detector(cfg.model, 3))
    ref = build_reference(mods, version, cfg.model, 3)
    theirs_state = ref.state_dict()
    state = original_names(ours.state_dict(), "rtdetr", cfg.model.rtdetr_version)
    missing, unexpected = ref.load_state_dict(state, strict=True)
    print(f"\n== {version}: strict load into the reference: {len(theirs_state)} entries, missing {missing}, ", end="")
    print(f"unexpected {unexpected}")
    if manifest_dir is not None and version != "v2-discrete":
        path = manifest_dir / f"rtdetr{'v2' if version != 'v1' else ''}_reference_keys.json"
        keys = {k: list(v.shape) for k, v in theirs_state.items()}
        path.write_text(json.dumps({"model": {**fields, **SMALL}, "keys": keys}, indent=0))
        print(f"manifest: {len(keys)} keys -> {path}")
    theirs, out, targets = run_both(ref, ours, cfg, SIZE)
    layers_t = [*theirs["aux_outputs"][: cfg.model.dec_layers - 1], theirs]
    enc_t = theirs["enc_aux_outputs"][0] if "enc_aux_outputs" in theirs else theirs["aux_outputs"][-1]
    rows = [
        (f"layer {i} {k}", a[k], b[k])
        for i, (a, b) in enumerate(zip([*out["aux_outputs"], out], layers_t))
        for k in ("pred_logits", "pred_boxes")
    ]
    rows += [(f"proposals {k}", out["interm_outputs"][k], enc_t[k]) for k in ("pred_logits", "pred_boxes")]
    print(f"{'output':<24} {'max |ours - reference|':>24}")
    for name, a, b in rows:
        print(f"{name:<24} {float((a - b).detach().abs().max()):>24.3g}")

    matcher = mods["zoo.rtdetr.matcher"].HungarianMatcher(
        {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, True, 0.25, 2.0
    )
    weights = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}
    crit = mods[names[-1]].SetCriterion if version == "v1" else mods[names[-1]].RTDETRCriterionv2
    criterion = crit(matcher, weights, ["vfl", "boxes"], alpha=0.75, gamma=2.0, num_classes=3)
    ref_losses = {k: float(v) for k, v in criterion(theirs, targets).items()}
    our_weights = model_detection_weights(cfg.loss, cfg.model)
    our_losses = {k: float(v) * our_weights[k] for k, v in SetCriterion.from_config(cfg.loss, 3)(out, targets).items()}
    last_aux = cfg.model.dec_layers - 1  # v1 lists the proposals as its last aux output

    def ours_name(name: str) -> str:
        base = name.replace("loss_vfl", "loss_cls")
        if "_enc_0" in base or (version == "v1" and base.endswith(f"_aux_{last_aux}")):
            return base.split("_aux_")[0].split("_enc_")[0] + "_interm"
        return base.replace("_aux_", "_")

    print(f"{'loss term (reference)':<24} {'reference':>12} {'ours':>12}")
    for name in sorted(ref_losses):
        print(f"{name:<24} {ref_losses[name]:>12.6f} {our_losses.get(ours_name(name), float('nan')):>12.6f}")
    worst = max(abs(our_losses.get(ours_name(k), float("inf")) - v) for k, v in ref_losses.items())
    print(
        f"total: reference {sum(ref_losses.values()):.6f}, ours {sum(our_losses.values()):.6f}; worst term {worst:.3g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtdetr", type=Path, required=True, help="a clone of lyuwenyu/RT-DETR")
    parser.add_argument("--manifest-dir", type=Path, help="write the reference's key/shape manifests here")
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=list(VERSIONS))
    args = parser.parse_args()
    for version in args.versions:
        compare(version, args.rtdetr, args.manifest_dir)


if __name__ == "__main__":
    main()
