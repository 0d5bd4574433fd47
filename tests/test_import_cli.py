"""`clockdistill import` and `train --init-from` through the command line: bad checkpoints stop with
one line and exit 2 before anything is written; a fine-tuned detector starts from the imported
weights with its class heads mapped by name or class map."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli, write_coco

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) builds the checkpoints")

from reference_layout import original_layout, reference_args  # noqa: E402
from test_reference_detectors import _hf_deformable  # noqa: E402

from clockdistill.weights.importer import import_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict:
    """A tiny Deformable DETR (box refinement) in the original repository's layout, with its args."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("original")
    _hf_deformable("refine").save_pretrained(root / "hf")
    meta = import_checkpoint(root / "hf", root / "ours")
    state = original_layout(load_file(root / "ours" / "model.safetensors"), meta["config"])
    return {"root": root, "state": state, "args": reference_args(meta["config"]), "meta": meta}


def _save(path: pathlib.Path, state: dict, args: argparse.Namespace | None) -> pathlib.Path:
    torch.save({"model": state, **({"args": args} if args is not None else {})}, path)
    return path


def _fails_with(tmp_path, args: list[str], pattern: str) -> None:
    out = tmp_path / "imported"
    proc = run_cli("import", *args, "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]
    assert not out.exists()  # nothing written


def test_a_checkpoint_whose_shapes_do_not_fit_names_the_first_mismatch(original, tmp_path):
    path = _save(tmp_path / "ckpt.pth", original["state"], original["args"])
    _fails_with(
        tmp_path,
        [str(path), "--set", "model.ffn_dim=64"],
        "transformer.encoder.layers.0.linear1.weight has shape (32, 64); it is the detector's "
        "encoder.layers.0.linear1.weight, whose shape is (64, 64)",
    )


def test_missing_and_left_over_tensors_are_counted_and_named(original, tmp_path):
    state = {k: v for k, v in original["state"].items() if k != "transformer.level_embed"}
    _fails_with(
        tmp_path,
        [str(_save(tmp_path / "missing.pth", state, original["args"]))],
        "1 tensor(s) of the detector missing (first: level_embed), 0 of the checkpoint left over",
    )
    state = {**original["state"], "transformer.encoder.extra.weight": torch.zeros(2)}
    _fails_with(
        tmp_path,
        [str(_save(tmp_path / "extra.pth", state, original["args"]))],
        "0 tensor(s) of the detector missing (first: -), 1 of the checkpoint left over "
        "(first: transformer.encoder.extra.weight)",
    )


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused(original, tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"model": original["state"], "hook": pathlib.Path("anything")}, path)  # an object the loader refuses
    _fails_with(tmp_path, [str(path)], "is not a plain state dict (refused by the weights-only loader")


def test_an_unknown_layout_lists_the_known_ones(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv.weight": torch.zeros(3, 3)}, path)
    _fails_with(tmp_path, [str(path)], "layout not understood (known: a Hugging Face model directory")
    (tmp_path / "empty").mkdir()
    _fails_with(tmp_path, [str(tmp_path / "empty")], "holds no model.safetensors or pytorch_model.bin")


def test_a_truncated_checkpoint_says_so(original, tmp_path):
    whole = _save(tmp_path / "whole.pth", original["state"], original["args"]).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # as a download or copy cut short leaves it
    _fails_with(tmp_path, [str(tmp_path / "cut.pth")], "cut.pth is truncated or not a PyTorch checkpoint (")


def test_original_settings_this_import_does_not_build_are_named(original, tmp_path):
    for change, named in (
        ({"enc_n_points": 8, "dec_n_points": 4}, "args.enc_n_points (8) and args.dec_n_points (4) differ"),
        ({"position_embedding": "learned"}, "args.position_embedding is 'learned'"),
        ({"modelname": "dab_deformable_detr"}, "args.modelname is 'dab_deformable_detr'"),
    ):
        args = argparse.Namespace(**{**vars(original["args"]), **change})
        _fails_with(tmp_path, [str(_save(tmp_path / "other.pth", original["state"], args))], named)


def _eight_heads_two_points(tmp_path: pathlib.Path):
    """Our Deformable DETR with 8 heads x 2 sampling points: its offsets have the rows of 4 x 4."""
    from reference_layout import perturb

    from clockdistill.config.layers import resolve_config
    from clockdistill.models.build import build_detector

    cfg = resolve_config({"model": {"preset": "deformable-detr-tiny-teacher", "nheads": 8, "n_points": 2}})
    cfg = cfg.updated({"model.num_classes": 3})
    torch.manual_seed(0)
    model = build_detector(cfg.model, 3).eval()
    perturb(model)
    return model, original_layout(model.state_dict(), cfg.to_dict()), cfg


def test_heads_and_points_the_tensors_cannot_tell_are_asked_for_not_guessed(tmp_path):
    """Without its args, 8 heads x 2 points and 4 x 4 have the same shapes: the import asks for one of
    them (and the dilation) by name; given, the imported detector computes what the source does."""
    from clockdistill.checkpoint import load_detector

    source, state, _ = _eight_heads_two_points(tmp_path)
    path = _save(tmp_path / "no-args.pth", state, None)
    _fails_with(
        tmp_path,
        [str(path)],
        "its tensors do not tell model.nheads or model.n_points (their product: 16), model.dilation; "
        "give them with --set",
    )
    _fails_with(tmp_path, [str(path), "--set", "model.nheads=3"], "model.nheads=3 does not divide the checkpoint's 16")
    out = tmp_path / "imported"
    proc = run_cli("import", str(path), "--out", str(out), "--set", "model.nheads=8", "--set", "model.dilation=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported, meta = load_detector(out)
    assert (meta["config"]["model"]["nheads"], meta["config"]["model"]["n_points"]) == (8, 2)
    assert run_cli("import", str(path), "--out", str(tmp_path / "4x4"), "--set", "model.nheads=4",
                   "--set", "model.dilation=false").returncode == 0  # fmt: skip
    wrong, _ = load_detector(tmp_path / "4x4")  # what the import guessed before it asked
    torch.manual_seed(0)
    images, mask = torch.rand(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        a, b, c = source(images, mask)["pred_logits"], imported(images, mask)["pred_logits"], wrong(images, mask)
    # the import's frozen BatchNorm rounds differently from the source's BatchNorm in eval: 1e-6, not 0
    print(f"8x2: {(a - b).abs().max():.1e}, read as 4x4: {(a - c['pred_logits']).abs().max():.2f}")
    assert (a - b).abs().max() < 1e-4 and (a - c["pred_logits"]).abs().max() > 0.05


@pytest.mark.parametrize("variant", ["refine", "two-stage"])
def test_a_transformers_model_saved_with_its_heads_tied_imports_as_transformers_loads_it(variant, tmp_path):
    """transformers' default tie_word_embeddings writes a tied head once (box refinement: class_embed.0
    only; two-stage: only the decoder's copies); the import takes the tied copies from their source,
    as transformers does when it loads the file."""
    from test_reference_detectors import TOL, _batch, _compare, _run_both

    from clockdistill.checkpoint import load_detector

    torch.manual_seed(0)
    hf = _hf_deformable(variant)
    tied = transformers.DeformableDetrForObjectDetection(
        transformers.DeformableDetrConfig(**{**hf.config.to_dict(), "tie_word_embeddings": True})
    ).eval()
    tied.load_state_dict(hf.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert "class_embed.1.weight" not in saved  # what a user fine-tuning in transformers has
    again = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    import_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours, _ = load_detector(tmp_path / "ours")
    images, valid = _batch()
    out, theirs = _run_both(again, ours, images, valid)
    assert _compare(out, theirs, theirs.encoder_last_hidden_state) < TOL


def test_import_to_a_data_sets_classes_and_fine_tune_with_a_class_map(original, tmp_path):
    """COCO-style names in the checkpoint, other names in the data: heads follow the class map."""
    from clockdistill.checkpoint import load_detector

    path = _save(tmp_path / "ckpt.pth", original["state"], original["args"])
    imported = tmp_path / "imported"
    assert run_cli("import", str(path), "--out", str(imported)).returncode == 0
    old, old_meta = load_detector(imported)
    assert old_meta["class_names"] == ["class_0", "class_1", "class_2"]
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(1, 5)]
    anns = [
        {"id": i, "image_id": i, "category_id": 7 if i % 2 else 3, "bbox": [8, 8, 20, 16], "area": 320, "iscrowd": 0}
        for i in range(1, 5)
    ]
    categories = [{"id": 3, "name": "Car"}, {"id": 7, "name": "Pedestrian"}, {"id": 9, "name": "Tram"}]
    data = tmp_path / "data"
    for split in ("train", "val"):
        write_coco(data, split, images, anns, categories)
    class_map = tmp_path / "map.yaml"
    class_map.write_text("Car: class_2\nPedestrian: class_0\n")
    out = tmp_path / "head"
    proc = run_cli("import", str(path), "--out", str(out), "--data", str(data), "--class-map", str(class_map))
    assert proc.returncode == 0, proc.stderr[-2000:]
    new, meta = load_detector(out)
    assert meta["class_names"] == ["Car", "Pedestrian", "Tram"] and meta["label_to_cat"] == [3, 7, 9]
    for i in range(2):  # the detector's layers keep their class heads' rows by the map; Tram starts fresh
        w_old, w_new = old.class_embed[i].weight, new.class_embed[i].weight
        assert torch.equal(w_new[0], w_old[2]) and torch.equal(w_new[1], w_old[0])
        assert not any(torch.equal(w_new[2], w_old[j]) for j in range(3))
        assert new.class_embed[i].bias[2].item() == pytest.approx(-4.59512, abs=1e-4)  # the focal prior
    assert torch.equal(new.level_embed, old.level_embed)
    # fine-tuning the imported detector on the data set with the same map, through `train --init-from`:
    # no model.* given, so the run is the checkpoint's own architecture (config/layers.py, layer 2)
    common = ["--set", f"data.root={data}", "--set", "data.max_size=64", "--set", "train.epochs=1"]
    common += ["--set", "train.batch_size=2", "--set", "train.device=cpu", "--set", "train.progress=false"]
    run = tmp_path / "ft"
    args = ["train", "--init-from", str(imported), "--class-map", str(class_map), *common]
    proc = run_cli(*args, "--set", f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 3 classes mapped (Car<-class_2, Pedestrian<-class_0)" in proc.stderr
    assert " 0 start fresh" in proc.stderr and "WARNING" not in proc.stderr, proc.stderr[-3000:]
    tuned = json.loads((run / "last" / "meta.json").read_text())["config"]["model"]
    assert {k: v for k, v in tuned.items() if k != "num_classes"} == {
        k: v for k, v in old_meta["config"]["model"].items() if k != "num_classes"
    }
    # another architecture named by the user: what it leaves of the checkpoint is a warning with the count
    proc = run_cli(*args, "--set", "model.dec_layers=1", "--set", f"train.output_dir={tmp_path / 'ft-1'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "of the checkpoint's tensors fit nothing in this detector" in warning[0], warning
