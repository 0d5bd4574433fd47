"""Deployable forms of a detector: TorchScript and ONNX (its size and speed: latency.py).

Both exported forms take a fixed input size, the training `data.max_size` S:
    images (B, 3, S, S) float, normalised like the training transform, zero-padded to S x S
    mask   (B, S, S) bool, True on padding
and return (pred_logits (B, Q, C) sigmoid logits, pred_boxes (B, Q, 4) normalised cxcywh of the
unpadded image). The batch size is free.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class Predictions(nn.Module):
    """The detector with a tuple output: exporters want tensors, not the training dict."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.detector(images, mask)
        return out["pred_logits"], out["pred_boxes"]


class FixedSize(nn.Module):
    """A scripted guard around the traced detector: a trace bakes in the spatial size, so any other
    size would silently give wrong boxes; this raises instead."""

    def __init__(self, traced: nn.Module, size: int):
        super().__init__()
        self.traced = traced
        self.size = size

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if (
            images.shape[-1] != self.size
            or images.shape[-2] != self.size
            or mask.shape[-1] != self.size
            or mask.shape[-2] != self.size
        ):
            raise RuntimeError(
                f"expected images (B, 3, {self.size}, {self.size}) and mask (B, {self.size}, {self.size}): "
                "pad to the export size"
            )
        return self.traced(images, mask)


def pad_to(images: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A collated batch (B, 3, H, W) / (B, H, W) zero-padded (mask True) to size x size."""
    B, _, H, W = images.shape
    padded = images.new_zeros(B, 3, size, size)
    padded[:, :, :H, :W] = images
    full = torch.ones(B, size, size, dtype=torch.bool, device=mask.device)
    full[:, :H, :W] = mask
    return padded, full


def to_torchscript(detector: nn.Module, example: tuple[Tensor, Tensor], size: int) -> torch.jit.ScriptModule:
    model = Predictions(detector).eval().requires_grad_(False)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings: the spatial size is baked in on purpose (FixedSize guards it)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        follow_input_device(traced)
        return torch.jit.script(FixedSize(traced, size))


def _forward_graphs(module: torch.jit.ScriptModule):
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule) and m._c._has_method("forward"):
            yield m._c._get_method("forward").graph


def _device_constants(graph) -> list:
    return [n for n in graph.findAllNodes("prim::Constant") if n.output().type().kind() == "DeviceObjType"]


def device_constants(module: torch.jit.ScriptModule) -> int:
    """How many device constants a traced module's forward graphs hold (each a device it would run on
    whatever its inputs' device)."""
    return sum(len(_device_constants(g)) for g in _forward_graphs(module))


def follow_input_device(traced: torch.jit.ScriptModule) -> int:
    """Replace every device constant the trace recorded (a tensor made with device=x.device: position
    codes, reference grids, shape tables; `cpu` when exported on a CPU) by the device of the graph's
    first tensor input, so the exported model runs on whatever device its inputs and weights are on.
    Returns how many were replaced."""
    replaced = 0
    for graph in _forward_graphs(traced):
        constants = _device_constants(graph)
        tensors = [v for v in list(graph.inputs())[1:] if v.type().kind() == "TensorType"]
        if constants and not tensors:
            raise RuntimeError(f"a traced submodule makes tensors on a fixed device and has no tensor input:\n{graph}")
        for node in constants:
            device = graph.create("prim::device", [tensors[0]])
            device.output().setType(node.output().type())
            device.insertAfter(node)
            node.output().replaceAllUsesWith(device.output())
            node.destroy()
            replaced += 1
    return replaced


def max_abs_difference(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def to_onnx(detector: nn.Module, example: tuple[Tensor, Tensor], path: Path) -> float:
    """Write the ONNX model and return the largest difference of onnxruntime's outputs to eager's
    on `example`."""
    import onnxruntime as ort

    model = Predictions(detector).eval().requires_grad_(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["images", "mask"],
            output_names=["pred_logits", "pred_boxes"],
            dynamic_axes={
                "images": {0: "batch"},
                "mask": {0: "batch"},
                "pred_logits": {0: "batch"},
                "pred_boxes": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
        eager = model(*example)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": example[0].cpu().numpy(), "mask": example[1].cpu().numpy()})
    return max_abs_difference(tuple(torch.from_numpy(o) for o in out), eager)
