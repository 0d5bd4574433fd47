"""The prepared GPU check: every GPU-readiness fix exercised on CUDA, in one run under 10 minutes on
one H100, and the step figures. Run it whenever a GPU is lent and put its output in the note.

    python tests/bench/gpu_check.py [--skip-benches] [--device cuda]

1. bf16 training steps (autocast, as training runs) of every family's tiny distillation pair: the loss
   is finite, and torch.cuda.set_sync_debug_mode counts the host syncs of one step (the CPU count of
   tests/test_host_reads.py is the ceiling it should meet);
2. deformable sampling under CUDA bf16 autocast sees fp32 locations (a spy on grid_sample), for
   MSDeformAttn and RT-DETRv2's attention;
3. a TorchScript export made on the CPU runs on CUDA inputs and equals the CUDA eager model;
4. latency in deployment precision (bf16) of the tiny students, from the node table;
5. the memory cap of a fractional trial: after limit_gpu_memory(0.25) an allocation of half the GPU
   raises out-of-memory, and release_gpu_memory returns the cache;
6. tests/bench/step_cost.py --device cuda and tests/bench/preset_steps.py (full-size presets at 640
   px), each under its own time limit.

Data-parallel fixes need two GPUs and stay on gloo (tests/test_ddp_ranks.py). On a machine without
CUDA, --device cpu runs parts 1, 3 and 4 as a dry run of the script itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from clockdistill.config.layers import resolve_config
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models.build import build_detector

PAIRS = [
    ("hybrid-tiny-student", "clockdistill"),
    ("dino-tiny-student", "clockdistill"),
    ("rtdetr-tiny-student", "clockdistill"),
    ("deformable-detr-tiny-student", "detrdistill"),
    ("dab-detr-tiny-student", "vanilla_kd"),
]
BENCH = Path(__file__).parent


def _batch(device: torch.device, size: int = 128, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    targets = []
    for i in range(batch):
        n = i % 3 + 1
        boxes = torch.rand(n, 4, generator=g) * 0.4 + 0.3
        targets.append({"labels": (torch.arange(n) % 3).to(device), "boxes": boxes.to(device),
                        "size": torch.tensor([size, size], device=device)})  # fmt: skip
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    return images, torch.zeros(batch, size, size, dtype=torch.bool, device=device), targets


def training_steps(device: torch.device) -> None:
    print("1. bf16 training steps, host syncs per step")
    for preset, method in PAIRS:
        torch.manual_seed(0)
        cfg = resolve_config({"model": {"preset": preset}, "distill": {"method": method}})
        teacher = build_detector(resolve_config({"model": {"preset": preset.replace("student", "teacher")}}).model, 3)
        task = Distiller(FrozenTeacher(teacher.to(device)), build_detector(cfg.model, 3).to(device), cfg)
        images, mask, targets = _batch(device)
        optimizer = torch.optim.AdamW([p for _, p in task.parameters_to_train()], lr=1e-4)
        syncs = -1
        for step in range(3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device.type == "cuda" and step == 2:
                    torch.cuda.set_sync_debug_mode("warn")
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    terms, weights = task.losses(images, mask, targets)
                loss = sum(weights[k] * v for k, v in terms.items() if k in weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
                    syncs = sum("synchroniz" in str(w.message) for w in caught)
            assert torch.isfinite(loss), f"{preset}: loss {loss.item()}"
        print(f"   {preset:<30} {method:<13} loss {loss.item():9.4f}  host syncs in step 3: {syncs}")


def sampling_precision(device: torch.device) -> None:
    import torch.nn.functional as F

    from clockdistill.models.deformable_attention import MSDeformAttn
    from clockdistill.models.rtdetr import MSDeformAttnV2

    seen, real = [], F.grid_sample

    def spy(v, grid, *a, **k):
        seen.append(grid.dtype)
        return real(v, grid, *a, **k)

    shapes = [(100, 167), (50, 84)]
    n = sum(h * w for h, w in shapes)
    memory, query = torch.randn(1, n, 256, device=device), torch.randn(1, 300, 256, device=device)
    attn = MSDeformAttn(256, 2, 8, 4).to(device)
    attn_v2 = MSDeformAttnV2(256, 2, 8, [4, 4], "default", 0.5).to(device)
    F.grid_sample = spy
    try:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            attn(query, torch.rand(1, 300, 2, 2, device=device), memory, shapes)
            attn_v2(query, torch.rand(1, 300, 4, device=device), memory, shapes)
    finally:
        F.grid_sample = real
    print(f"2. grid_sample grid dtypes under autocast: {sorted({str(d) for d in seen})} (want float32 only)")


def export_on_device(device: torch.device) -> None:
    from clockdistill.exporters import max_abs_difference, to_torchscript

    print("3. TorchScript exported on the CPU, run on", device)
    for preset in ("hybrid-tiny-student", "rtdetr-tiny-student", "dino-tiny-student"):
        torch.manual_seed(0)
        model = build_detector(resolve_config({"model": {"preset": preset}}).model, 3).eval()
        images, mask, _ = _batch(torch.device("cpu"), 96, 2)
        with tempfile.TemporaryDirectory() as tmp:
            to_torchscript(model, (images, mask), 96).save(f"{tmp}/m.pt")
            loaded = torch.jit.load(f"{tmp}/m.pt", map_location=device)
        model.to(device)
        with torch.no_grad():
            eager = model(images.to(device), mask.to(device))
            out = loaded(images.to(device), mask.to(device))
        diff = max_abs_difference(out, (eager["pred_logits"], eager["pred_boxes"]))
        print(f"   {preset:<22} max |exported - eager| on {device}: {diff:.2e}")


def latency(device: torch.device) -> None:
    from clockdistill.latency import node_latency_ms

    print("4. latency in deployment precision (node table)")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("hybrid-tiny-student", "rtdetr-tiny-student", "rtdetr-r18", "deformable-detr-r18"):
            cfg = resolve_config({"model": {"preset": preset}, "data": {"max_size": 640, "cache_dir": tmp}})
            ms, _ = node_latency_ms(build_detector(cfg.model, 80), cfg, device, "gpu_check")
            print(f"   {preset:<22} {ms:8.2f} ms at 640 px ({'bf16' if device.type == 'cuda' else 'fp32'})")


def memory_cap() -> None:
    from sweeps.tune.trial import limit_gpu_memory, release_gpu_memory

    total = torch.cuda.get_device_properties(0).total_memory
    limit_gpu_memory(0.25)
    try:
        torch.empty(total // 2, dtype=torch.uint8, device="cuda")
        print("5. memory cap: NOT enforced (half the GPU allocated under a 0.25 cap)")
    except torch.OutOfMemoryError:
        print("5. memory cap: half the GPU refused under a 0.25 cap (as it should be)")
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.empty(total // 8, dtype=torch.uint8, device="cuda")
    before = torch.cuda.memory_reserved()
    release_gpu_memory()
    print(f"   release_gpu_memory: reserved {before / 2**20:.0f} MiB -> {torch.cuda.memory_reserved() / 2**20:.0f} MiB")


def benches(limit_s: int) -> None:
    for script, args in (("step_cost.py", ["--device", "cuda"]), ("preset_steps.py", ["--device", "cuda"])):
        print(f"6. {script} {' '.join(args)}")
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                                 timeout=limit_s)  # fmt: skip
            print(run.stdout[-6000:] or run.stderr[-2000:])
        except subprocess.TimeoutExpired:
            print(f"   stopped after {limit_s} s")
        print(f"   ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-benches", action="store_true", help="parts 1-5 only")
    ap.add_argument("--bench-limit", type=int, default=150, help="seconds for each benchmark of part 6")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    training_steps(device)
    sampling_precision(device)
    export_on_device(device)
    latency(device)
    if device.type == "cuda":
        memory_cap()
        if not args.skip_benches:
            benches(args.bench_limit)
    print(f"gpu_check done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
