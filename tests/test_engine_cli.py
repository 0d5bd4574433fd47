"""Training, checkpoints, resume and the CLI end to end on tiny data."""

import json
import math

import pytest
import torch

from clockdistill.checkpoint import load_optimizer, load_weights, save_checkpoint
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.layers import resolve_config
from clockdistill.config.sections import TrainConfig
from clockdistill.engine import build_optimizer, fit, lr_factor
from clockdistill.models.build import build_detector
from conftest import run_cli


def tiny_config(data, out, **train):
    return resolve_config(
        {
            "data": {"root": str(data), "max_size": 96},
            "model": {"preset": "hybrid-tiny-student"},
            "train": {"epochs": 2, "batch_size": 4, "output_dir": str(out), "progress": False, **train},
        }
    )


def test_checkpoint_round_trip_without_pickle(tmp_path):
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student"}})
    model = build_detector(cfg.model, 3)
    opt = build_optimizer(list(model.named_parameters()), cfg.train)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, {"epoch": 1, "config": cfg.to_dict()}, opt)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "meta.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    other = build_detector(cfg.model, 3)
    load_weights(tmp_path / "ck", other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = build_optimizer(list(other.named_parameters()), cfg.train)
    assert load_optimizer(tmp_path / "ck", opt2, read_meta(tmp_path / "ck"))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_the_optimizer_gives_each_part_its_learning_rate():
    """Backbone at lr_backbone; sampling offsets and the reference-point layer at lr x lr_linear_proj_mult
    (the Deformable DETR recipe: 0.1); the rest at lr."""
    cfg = resolve_config(
        {
            "model": {"preset": "deformable-detr-tiny-student"},
            "train": {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 0.1},
        }
    )
    model = build_detector(cfg.model, 3)
    opt = build_optimizer(list(model.named_parameters()), cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            want = 1e-5
        elif "sampling_offsets" in name or name.startswith("reference_points."):
            want = 1e-5
            seen.add(name.split(".")[0])
        else:
            want = 1e-4
        assert lr_of[id(p)] == pytest.approx(want), name
    assert seen == {"encoder", "decoder", "reference_points"}


@pytest.mark.parametrize("crash_after", ["first", "second"])
def test_a_save_interrupted_between_its_renames_leaves_the_old_or_the_new_checkpoint(
    tmp_path, monkeypatch, crash_after
):
    """A save moves the previous checkpoint aside, then the new one in. A crash after either move
    (simulated: the process cannot be killed between two calls of a test) must leave a checkpoint
    that `recover_checkpoint` (which `fit` runs before resuming) finds whole."""
    import os

    from clockdistill import checkpoint as ck

    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student"}})
    model = build_detector(cfg.model, 3)
    save_checkpoint(tmp_path / "last", model, {"epoch": 0})
    calls, real_replace = [], os.replace

    def replace_then_crash(src, dst):
        calls.append(src)
        if crash_after == "second" or len(calls) == 1:
            real_replace(src, dst)
        if (crash_after == "first" and len(calls) == 1) or (crash_after == "second" and len(calls) == 2):
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ck.os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", model, {"epoch": 1})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert ck.recover_checkpoint(tmp_path / "last")
    assert read_meta(tmp_path / "last")["epoch"] == 1  # the new checkpoint was complete: it wins over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    load_weights(tmp_path / "last", build_detector(cfg.model, 3))
    # a crash while the new checkpoint is still being written leaves the old one in place
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "model.safetensors").write_bytes(b"partial")
    assert ck.recover_checkpoint(tmp_path / "last") and read_meta(tmp_path / "last")["epoch"] == 1


def test_lr_schedule_warmup_cosine_and_step():
    cfg = TrainConfig(warmup_iters=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert lr_factor(100, 100, 10, cfg) == pytest.approx(0.1)
    step = TrainConfig(warmup_iters=0, schedule="step", lr_drop_epochs=[2])
    assert lr_factor(19, 100, 10, step) == 1.0 and lr_factor(20, 100, 10, step) == pytest.approx(0.1)


def test_fit_reports_every_epoch_and_resumes(synth_data, tmp_path):
    seen = []
    cfg = tiny_config(synth_data, tmp_path / "run")
    result = fit(cfg, on_epoch_end=lambda e, m, ck: seen.append((e, m, ck)))
    assert (
        cfg == tiny_config(synth_data, tmp_path / "run") and cfg.model.num_classes == 0
    )  # fit kept its argument as it was
    assert [e for e, _, _ in seen] == [1, 2]
    metrics = seen[-1][1]
    for key in ("loss", "loss_cls", "loss_bbox", "loss_giou", "loss_cls_0", "lr", "AP", "AP50", "APs", "AP/circle"):
        assert key in metrics, key
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    meta = read_meta(tmp_path / "run" / "last")
    assert meta["epoch"] == 1 and len(meta["history"]) == 2 and meta["config"]["model"]["num_classes"] == 4
    assert result.best_epoch in (1, 2)
    # Asking for more epochs continues from epoch 3 with the saved weights, not from scratch.
    calls = []
    fit(tiny_config(synth_data, tmp_path / "run", epochs=3), on_epoch_end=lambda e, m, ck: calls.append(e))
    assert calls == [3]
    assert len(read_meta(tmp_path / "run" / "last")["history"]) == 3


def test_callback_can_stop_early(synth_data, tmp_path):
    calls = []
    fit(
        tiny_config(synth_data, tmp_path / "run", epochs=5, eval_every=5),
        on_epoch_end=lambda e, m, ck: calls.append(e) or True,
    )
    assert calls == [1]


def test_cli_train_then_evaluate(synth_data, tmp_path):
    out = tmp_path / "cli"
    r = run_cli(
        "train",
        "--set",
        f"data.root={synth_data}",
        "--set",
        "model.preset=hybrid-tiny-student",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=4",
        "--set",
        f"train.output_dir={out}",
        "--set",
        "data.max_size=96",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["best_epoch"] == 1
    r = run_cli("evaluate", "--checkpoint", str(out / "best"), "--data", str(synth_data), "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["AP"] == pytest.approx(summary["best_AP"], abs=1e-9)  # same checkpoint, same data, same number


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
        (["train", "--set", "model.preset=nope"], "model.preset: unknown preset 'nope'"),
        (["train", "--set", "train.lr=fast"], "train.lr: expected a number"),
        (["train"], "data.root: no data set given"),
        (["evaluate", "--checkpoint", "/nonexistent", "--data", "/nonexistent"], "not a checkpoint"),
        (["data", "index", "/nonexistent"], "data set directory not found"),
        (["data", "synth", "--out", "x", "--train", "-1"], "--train: expected a count >= 0"),
    ],
)
def test_cli_bad_input_one_line_nonzero(args, match):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_cli_bad_annotation_file(tmp_path):
    from conftest import write_coco

    path = write_coco(tmp_path, "train", [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}], [])
    path.write_text("not json")
    r = run_cli("data", "index", str(tmp_path), "--split", "train")
    assert r.returncode == 2 and "instances_train.json: not valid JSON" in r.stderr


def _commands(parser, path=()):
    """(command path, its parser) for the parser and every (nested) subcommand under it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_subcommand_has_help(capsys):
    """`clockdistill --help` through the real entry point, then every command's --help in-process:
    each says what it does and every option says what it is for."""
    import argparse

    from clockdistill.cli import build_parser

    r = run_cli("--help")
    assert r.returncode == 0 and "usage: clockdistill" in r.stdout and "demo" in r.stdout, r.stdout + r.stderr
    commands = list(_commands(build_parser()))
    assert {" ".join(path) for path, _ in commands} >= {
        "data synth",
        "data kitti",
        "data index",
        "train",
        "distill",
        "sweep",
        "sync",
        "evaluate",
        "best-student",
        "report",
        "demo",
    }
    for path, parser in commands:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*path, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith(f"usage: clockdistill {' '.join(path)}".rstrip()), out[:200]
        assert parser.description, f"{' '.join(path) or 'clockdistill'}: no description"
        listed = [
            a for sub in parser._actions if isinstance(sub, argparse._SubParsersAction) for a in sub._choices_actions
        ]
        silent = [
            a.option_strings or [a.dest]
            for a in parser._actions + listed
            if not a.help and a.dest != "help" and not isinstance(a, argparse._SubParsersAction)
        ]
        assert not silent, f"{' '.join(path)}: options without help: {silent}"


def test_resumed_training_equals_uninterrupted_training(synth_data, tmp_path):
    """Stop after epoch 1 and resume: the weights equal those of one straight 2-epoch run
    (same shuffle order, same augmentation, same optimizer state)."""
    from safetensors.torch import load_file

    fit(tiny_config(synth_data, tmp_path / "straight", eval_every=5))
    fit(tiny_config(synth_data, tmp_path / "resumed", eval_every=5), on_epoch_end=lambda e, m, ck: True)  # stop after 1
    assert read_meta(tmp_path / "resumed" / "last")["epoch"] == 0
    fit(tiny_config(synth_data, tmp_path / "resumed", eval_every=5))
    a = load_file(tmp_path / "straight" / "last" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
