"""Benchmark: training-step and frozen-forward times of the model presets, and what the speed
switches (train.channels_last, train.compile) do to them.

    python tests/bench/preset_steps.py [--device cuda|cpu] [--presets deformable-detr-r50 ...] [--batch 8]
                                       [--size 640] [--switches eager channels_last compile] [--repeats 10]

For every preset and switch: one full supervised training step (forward, set-criterion loss,
backward, AdamW step) on a batch of --batch synthetic images padded to --size x --size, and one
forward without gradients (what a frozen teacher costs a live-teacher distillation step). bf16
autocast on CUDA (as training runs there), fp32 on CPU. Variants are interleaved round-robin and
each reports its median, so machine noise hits all alike; compile's first steps (the compilation)
are warm-up and not timed. Printed: ms per step, images/s, peak CUDA memory, and the CUDA memory a
variant's step adds at its peak (activations, gradients, optimizer state), and each switch's step
time over eager (below 1.0: the switch helps this preset on this device).

Defaults: on CUDA the full-size Deformable DETR, DAB-DETR and hybrid teachers and students at 640 px;
on CPU their tiny versions at 128 px. Each faithful preset's times are also printed over those of the
hybrid preset of its size, which it replaced as the detector of the paper detectors' names.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import device_sync, fixed_batch, interleaved_medians, training_step  # tests/bench/timing.py

from clockdistill.config.layers import resolve_config
from clockdistill.engine import DetectionTask, accelerate
from clockdistill.losses.criterion import SetCriterion, model_detection_weights
from clockdistill.models.build import build_detector

SWITCHES = {"eager": {}, "channels_last": {"channels_last": True}, "compile": {"compile": "default"}}
REPLACED = {  # faithful preset -> the hybrid preset of its size
    "deformable-detr-r50": "hybrid-teacher",
    "deformable-detr-r18": "hybrid-student",
    "dab-detr-r50": "hybrid-teacher",
    "dab-detr-r18": "hybrid-student",
    "deformable-detr-tiny-teacher": "hybrid-tiny-teacher",
    "deformable-detr-tiny-student": "hybrid-tiny-student",
    "dab-detr-tiny-teacher": "hybrid-tiny-teacher",
    "dab-detr-tiny-student": "hybrid-tiny-student",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--presets",
        nargs="+",
        help="model presets (default: the full-size faithful and hybrid teachers and students on CUDA, their "
        "tiny versions on CPU)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, help="square canvas side in pixels (default: 640 on CUDA, 128 on CPU)")
    ap.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    presets = args.presets or [p for p in REPLACED if ("tiny" in p) != cuda] + sorted(
        {v for k, v in REPLACED.items() if ("tiny" in k) != cuda}
    )
    size = args.size or (640 if cuda else 128)

    ds, images, mask, targets = fixed_batch(None, args.batch, size, device, prefix="preset-steps-")
    sync = device_sync(device)

    jobs, peak = {}, {}
    for preset in presets:
        for switch in args.switches:
            cfg = resolve_config({"model": {"preset": preset}, "train": SWITCHES[switch]})
            torch.manual_seed(0)
            model = build_detector(cfg.model, ds.num_classes).to(device)
            task = DetectionTask(
                model,
                SetCriterion.from_config(cfg.loss, ds.num_classes),
                model_detection_weights(cfg.loss, cfg.model),
            )
            accelerate(task, cfg.train)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            x = images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images

            def step(task=task, opt=opt, x=x):
                task.model.train()
                training_step(task, opt, x, mask, targets, cuda)

            @torch.no_grad()
            def forward(model=model, x=x):
                model.eval()
                with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                    model(x, mask)

            jobs[(preset, switch, "step")] = step
            jobs[(preset, switch, "forward")] = forward
    for key, fn in jobs.items():  # warm-up (and compilation) one variant at a time, peak memory of each
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        if key[1] == "compile":
            print(f"{key[0]} {key[2]}: compiled and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        peak[key] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if cuda else 0.0
    med = interleaved_medians(jobs, args.repeats, sync)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n# batch {args.batch} at {size}x{size}, {name}, {'bf16 autocast' if cuda else 'fp32'}, torch "
        f"{torch.__version__}, "
        f"median of {args.repeats}"
    )
    print(
        f"{'preset':<30}{'switch':<15}{'step ms':>9}{'img/s':>8}{'fwd ms':>9}{'step MiB':>10}"
        f"{'step / eager':>14}{'fwd / eager':>13}"
    )
    for preset in presets:
        for switch in args.switches:
            s, f = med[(preset, switch, "step")], med[(preset, switch, "forward")]
            es, ef = med.get((preset, "eager", "step")), med.get((preset, "eager", "forward"))
            mem = f"{peak[(preset, switch, 'step')]:.0f}" if cuda else "-"
            print(
                f"{preset:<30}{switch:<15}{s * 1e3:>9.1f}{args.batch / s:>8.1f}{f * 1e3:>9.1f}{mem:>10}"
                f"{(f'{s / es:.3f}' if es else '-'):>14}{(f'{f / ef:.3f}' if ef else '-'):>13}"
            )
    if "eager" in args.switches:
        for faithful, hybrid in REPLACED.items():
            if faithful in presets and hybrid in presets:
                step = med[(faithful, "eager", "step")] / med[(hybrid, "eager", "step")]
                fwd = med[(faithful, "eager", "forward")] / med[(hybrid, "eager", "forward")]
                print(f"{faithful} / {hybrid}, eager: step {step:.2f}x, forward {fwd:.2f}x")


if __name__ == "__main__":
    main()
