"""train.channels_last and train.compile change speed, not results."""

import copy

import pytest
import torch

from clockdistill.config.layers import resolve_config
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.transforms import DetectionTransform, collate
from clockdistill.engine import DetectionTask, accelerate
from clockdistill.errors import ConfigError
from clockdistill.losses.criterion import SetCriterion, model_detection_weights
from clockdistill.models.build import build_detector


@pytest.fixture(scope="module")
def batch(synth_data):
    ds = CocoDetection(synth_data, "train", DetectionTransform(96, train=False))
    return collate([ds[i] for i in range(4)], pad_to=(96, 96))


def _task(cfg):
    torch.manual_seed(0)
    model = build_detector(cfg.model, 4)
    return DetectionTask(model, SetCriterion.from_config(cfg.loss, 4), model_detection_weights(cfg.loss, cfg.model))


def _step(task, batch, channels_last=False):
    images, mask, targets = batch
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    terms, weights = task.losses(images, mask, targets)
    loss = sum(weights[k] * v for k, v in terms.items())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("switch", [{"channels_last": True}, {"compile": "default"}], ids=["channels_last", "compile"])
def test_speed_switches_leave_loss_and_gradients_unchanged(batch, switch, monkeypatch):
    cfg = resolve_config({"model": {"preset": "hybrid-tiny-student"}, "train": switch})
    eager = _task(cfg)
    fast = _task(cfg)
    fast.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    compiled = []
    if cfg.train.compile != "off":
        # The switch is proven through TorchDynamo's graph capture and AOT autograd (the aot_eager
        # backend): every graph break, guard and backward graph of our encoder and decoder is real.
        # Inductor's own C++ code generation would add 4-5 minutes of CPU compilation here and tests
        # nothing of ours; tests/bench/preset_steps.py times the real backend.
        real_compile = torch.compile

        def aot_eager(fn, **kwargs):
            compiled.append(fn.__name__)
            return real_compile(fn, **{**kwargs, "backend": "aot_eager", "mode": None})

        monkeypatch.setattr(torch, "compile", aot_eager)
    accelerate(fast, cfg.train)
    if cfg.train.compile != "off":
        assert compiled == ["encode", "decode"] and {"encode", "decode"} <= set(vars(fast.model))  # compiled in place
    if cfg.train.channels_last:
        assert fast.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss_e, grads_e = _step(eager, batch)
    loss_f, grads_f = _step(fast, batch, cfg.train.channels_last)
    assert abs(loss_e - loss_f) <= 1e-4 * abs(loss_e)
    assert grads_e.keys() == grads_f.keys()
    # Other kernels sum in another order; where an activation sits on a ReLU kink or a sampling
    # point on a cell border that can move a gradient by more than rounding (measured: 0.6% of one
    # tensor's norm with channels-last on one CPU thread, 1e-5 on two), never by a tenth of it.
    for n in grads_e:
        rel = ((grads_e[n] - grads_f[n]).norm() / grads_e[n].norm().clamp(min=1e-12)).item()
        assert rel < 2e-2, (n, rel)
    assert set(fast.model.state_dict()) == set(eager.model.state_dict())  # checkpoints keep their names


def test_compiled_teacher_and_student_do_not_recompile_for_new_input_sizes(monkeypatch):
    """A distillation run's compiled encoder and decoder over mixed input sizes (multi-scale training,
    padded batches), teacher under no_grad and student training: one graph each, no recompile. Before,
    the level grids' linspace specialised on every size and the teacher and student shared one code
    object, so the recompile limit was reached within a few steps and the rest ran eagerly. Dynamo's
    capture and guards are real; the eager backend skips code generation (tests nothing of ours)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager", "mode": None}))
    torch._dynamo.reset()
    counters.clear()
    student = build_detector(resolve_config({"model": {"preset": "hybrid-tiny-student"}}).model, 3)
    teacher = build_detector(resolve_config({"model": {"preset": "hybrid-tiny-teacher"}}).model, 3)
    task = type("Task", (), {"model": student, "teacher": teacher})()
    accelerate(task, resolve_config({"train": {"compile": "default"}}).train)
    for size in (96, 128, 112):
        images, mask = torch.randn(2, 3, size, size + 32), torch.zeros(2, size, size + 32, dtype=torch.bool)
        mask[1, :, size:] = True
        with torch.no_grad():
            teacher(images, mask)
        student(images, mask)["pred_logits"].sum().backward()
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])  # encode and decode of each model
    torch._dynamo.reset()


def test_unknown_compile_mode_is_one_line():
    with pytest.raises(ConfigError, match=r"^train.compile: expected one of"):
        resolve_config({"train": {"compile": "fast"}})
