"""Benchmark: our D-FINE (model and loss) against the original repository's own code, on the CPU.

    git clone https://github.com/Peterande/D-FINE /src/D-FINE
    python tests/bench/parity_dfine.py --dfine /src/D-FINE [--manifest tests/data/dfine_reference_keys.json]

The tests compare our D-FINE with transformers' port (tests/test_dfine.py); transformers' port of the
loss differs from the reference (no union matching, no pre-box term, another DDF normaliser), so the
loss is compared here only, against the code the published checkpoints were trained with. Our model
at a small size on the full-width HGNetV2 B0 (the reference builds only its named variants), every
tensor perturbed, is loaded into the reference model with strict=True (our parameter names are the
reference's; the reference holds `up` and `reg_scale` twice, and both copies get ours), and both run
on a 2-image batch: every decoder layer's logits, boxes and edge distributions, the pre-box head's
and the selected proposals' outputs (training mode, BatchNorm in evaluation, no denoising queries:
the reference draws them at random). Then the reference's DFINECriterion (its HungarianMatcher, VFL,
boxes and local losses at the published weights) on the reference's outputs against our criterion on
ours: every term, and the weighted total.

`--manifest FILE` writes the reference's state-dict key/shape manifest at this size (the import test
checks the original-layout import against it).

How the original runs here: only its model and loss modules are imported (src/nn/backbone/hgnetv2.py,
src/zoo/dfine/*; tests/bench/reference_code.py). The original code is imported from the given
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

from clockdistill.config.layers import resolve_config
from clockdistill.losses.criterion import SetCriterion, model_detection_weights
from clockdistill.models.build import build_detector

SMALL = dict(  # on top of the preset dfine-s: its B0 backbone at full width, a small encoder and decoder
    d_model=64, nheads=4, ffn_dim=128, encoder_ffn_dim=128, dec_layers=3, num_queries=20, dn_number=10,
    expansion=0.5, depth_mult=0.34, level_points=[3, 6, 3],
)  # fmt: skip
SIZE = 128


def load_reference(root: Path) -> dict:
    mods = load(
        root / "src",
        [f"zoo.dfine.{n}" for n in ("dfine_decoder", "hybrid_encoder", "dfine_criterion", "matcher", "dfine")]
        + ["nn.backbone.hgnetv2"],
    )
    short = {"dfine_decoder": "decoder", "dfine_criterion": "criterion"}
    return {short.get(k.split(".")[-1], k.split(".")[-1]): v for k, v in mods.items()}


def build_reference(mods, m, num_classes: int):
    backbone = mods["hgnetv2"].HGNetv2(
        "B0", use_lab=m.use_lab, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, pretrained=False
    )
    encoder = mods["hybrid_encoder"].HybridEncoder(
        in_channels=[256, 512, 1024], hidden_dim=m.d_model, nhead=m.nheads, dim_feedforward=m.encoder_ffn_dim,
        expansion=m.expansion, depth_mult=m.depth_mult,
    )  # fmt: skip
    decoder = mods["decoder"].DFINETransformer(
        num_classes=num_classes, hidden_dim=m.d_model, num_queries=m.num_queries, feat_channels=[m.d_model] * 3,
        feat_strides=[8, 16, 32], num_levels=3, num_points=list(m.level_points), nhead=m.nheads,
        num_layers=m.dec_layers, dim_feedforward=m.ffn_dim, num_denoising=m.dn_number, reg_max=m.reg_max,
        reg_scale=m.reg_scale,
    )  # fmt: skip
    return mods["dfine"].DFINE(backbone, encoder, decoder)


def reference_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under the reference's names: the same names, `up` and `reg_scale` also under the FDR decoder."""
    state = dict(ours)
    for name in ("up", "reg_scale"):
        state[f"decoder.decoder.{name}"] = ours[f"decoder.{name}"]
    return {k: v for k, v in state.items() if k in theirs or not k.endswith("num_batches_tracked")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dfine", type=Path, required=True, help="a clone of Peterande/D-FINE")
    parser.add_argument("--manifest", type=Path, help="write the reference's key/shape manifest here")
    args = parser.parse_args()
    torch.manual_seed(0)
    mods = load_reference(args.dfine)
    cfg = resolve_config({"model": {"preset": "dfine-s", **SMALL}})
    ours = perturbed(build_detector(cfg.model, 3)).eval()
    ref = build_reference(mods, cfg.model, 3)
    theirs_keys = ref.state_dict()
    missing, unexpected = ref.load_state_dict(reference_state(ours.state_dict(), theirs_keys), strict=True)
    print(f"strict load into the reference: {len(theirs_keys)} entries, missing {missing}, unexpected {unexpected}")
    if args.manifest:
        manifest = {k: list(v.shape) for k, v in theirs_keys.items()}
        args.manifest.write_text(json.dumps({"preset": "dfine-s", "model": SMALL, "keys": manifest}, indent=0))
        print(f"manifest: {len(manifest)} keys -> {args.manifest}")
    theirs, out, targets = run_both(ref, ours, cfg, SIZE)

    def diff(a, b) -> float:
        return float((a - b).detach().abs().max())

    print(f"{'output':<28} {'max |ours - reference|':>24}")
    rows = [
        ("selected proposals logits", out["interm_outputs"]["pred_logits"], theirs["enc_aux_outputs"][0]["pred_logits"])
    ]
    rows.append(
        ("selected proposals boxes", out["interm_outputs"]["pred_boxes"], theirs["enc_aux_outputs"][0]["pred_boxes"])
    )
    rows += [("pre-box head logits", out["pre_outputs"]["pred_logits"], theirs["pre_outputs"]["pred_logits"])]
    rows += [("pre-box head boxes", out["pre_outputs"]["pred_boxes"], theirs["pre_outputs"]["pred_boxes"])]
    for i, (a, b) in enumerate(zip([*out["aux_outputs"], out], [*theirs["aux_outputs"], theirs])):
        for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points"):
            rows.append((f"layer {i} {key}", a[key], b[key]))
    for name, a, b in rows:
        print(f"{name:<28} {diff(a, b):>24.3g}")

    m = cfg.model
    matcher = mods["matcher"].HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, True, 0.25, 2.0)
    weights = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
    criterion = mods["criterion"].DFINECriterion(
        matcher, weights, ["vfl", "boxes", "local"], alpha=0.75, gamma=2.0, num_classes=3, reg_max=m.reg_max
    )
    ref_losses = {k: float(v) for k, v in criterion(theirs, targets).items()}
    our_weights = model_detection_weights(cfg.loss, m)
    our_losses = {k: float(v) * our_weights[k] for k, v in SetCriterion.from_config(cfg.loss, 3)(out, targets).items()}

    def ours_name(name: str) -> str:  # the reference's term names -> ours
        base, _, suffix = name.partition("_aux_") if "_aux_" in name else (name, "", "")
        base = base.replace("loss_vfl", "loss_cls")
        if suffix:
            return f"{base}_{suffix}"
        return base.replace("_enc_0", "_interm")

    print(f"\n{'loss term (reference name)':<28} {'reference':>12} {'ours':>12}")
    worst = 0.0
    for name in sorted(ref_losses):
        mine = our_losses.get(ours_name(name), 0.0)  # (the reference's last-layer DDF is 0; ours omits it)
        worst = max(worst, abs(mine - ref_losses[name]))
        print(f"{name:<28} {ref_losses[name]:>12.6f} {mine:>12.6f}")
    print(
        f"total: reference {sum(ref_losses.values()):.6f}, ours {sum(our_losses.values()):.6f}; worst term {worst:.3g}"
    )


if __name__ == "__main__":
    main()
