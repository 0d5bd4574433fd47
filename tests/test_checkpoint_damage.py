"""A trial checkpoint cut short on the storage (a power cut) is never loaded: the trial resumes from its
previous intact checkpoint, or starts over, instead of failing every retry on the same file."""

import os

import torch
from ray import tune

from clockdistill.checkpoint import damage, save_checkpoint
from clockdistill.checkpoint_meta import read_meta
from sweeps.tune.trial import restore_checkpoint


def _checkpoints(trial_dir, epochs=(1, 2)):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    paths = []
    for e in epochs:
        path = trial_dir / f"checkpoint_{e:06d}"
        save_checkpoint(path, model, {"epoch": e, "config": {}}, opt)
        paths.append(path)
    return paths


def _cut(path, name="model.safetensors"):
    f = path / name
    os.truncate(f, f.stat().st_size // 2)


def test_damage_names_the_file_cut_short(tmp_path):
    (ckpt,) = _checkpoints(tmp_path, (1,))
    assert damage(ckpt) is None
    _cut(ckpt, "optimizer.safetensors")
    assert damage(ckpt).startswith("optimizer.safetensors: ")
    (ckpt / "meta.json").write_text("{")
    assert damage(ckpt).startswith("meta.json: ")


def test_a_retry_resumes_from_the_previous_intact_checkpoint(tmp_path):
    old, new = _checkpoints(tmp_path / "trial")
    _cut(new)
    work = tmp_path / "work"
    assert restore_checkpoint(tune.Checkpoint.from_directory(str(new)), work)
    assert read_meta(work / "last")["epoch"] == 1 and damage(work / "last") is None


def test_without_an_intact_checkpoint_the_trial_starts_over(tmp_path):
    old, new = _checkpoints(tmp_path / "trial")
    _cut(new)
    _cut(old)
    work = tmp_path / "work"
    (work / "last").mkdir(parents=True)
    assert not restore_checkpoint(tune.Checkpoint.from_directory(str(new)), work)
    assert not (work / "last").exists()  # fit starts from epoch 1


def test_an_intact_checkpoint_is_restored_as_it_is(tmp_path):
    old, new = _checkpoints(tmp_path / "trial")
    work = tmp_path / "work"
    assert restore_checkpoint(tune.Checkpoint.from_directory(str(new)), work)
    assert read_meta(work / "last")["epoch"] == 2
