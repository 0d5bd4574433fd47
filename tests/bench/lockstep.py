"""Benchmark: K trials on one machine sharing one teacher forward per batch (distill.teacher_share:
node), against the same K trials each running its teacher, and K plain students.

    python tests/bench/lockstep.py [--k 2] [--teacher deformable-detr-r50 --student deformable-detr-r18]
                                   [--size 320] [--batch 2] [--steps 6] [--rounds 3] [--device cpu|cuda]
                                   [--enc-layers 6,1]   (students of different speeds: one value per trial)

A real local Ray: K actors (one CPU thread each, or 1/K of the GPU) train K students (different
seeds) on the same sequence of batches, started together, as a sweep's trials are; the teacher
exchange is the sweep's (a hub actor, outputs through the object store). Each round runs the four
modes one after the other (plain student, live teacher, shared teacher, and `apart`: the exchange on
but the trials out of step, so that nothing can be shared: its cost alone), so machine noise hits all
alike; every step's time is kept and the median per mode reported, with its ratio to the plain step.
`shared` is the part of the teacher outputs a trial took from a peer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

MODES = ("plain", "live", "shared", "apart")


@ray.remote
class Trial:
    def __init__(self, work: str, data: str, args: dict, seed: int):
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from timing import training_step

        from clockdistill.config.layers import resolve_config
        from clockdistill.data.dataset import CocoDetection
        from clockdistill.data.transforms import DetectionTransform, collate
        from clockdistill.distill.distiller import Distiller
        from clockdistill.distill.teacher import FrozenTeacher
        from clockdistill.models.build import build_detector
        from sweeps.tune.exchange import RayExchange

        torch.set_num_threads(1)
        self.seed = seed
        self.step_fn, self.device = training_step, torch.device(args["device"])
        ds = CocoDetection(data, "train", DetectionTransform(args["size"], train=False))
        b = args["batch"]
        self.batches = []
        for k in range(args["steps"] + 1):  # one warm-up batch, then the timed ones
            items = [ds[(k * b + i) % len(ds)] for i in range(b)]
            images, mask, targets = collate(items, multiple=64)
            targets = [{n: (v.to(self.device) if torch.is_tensor(v) else v) for n, v in t.items()} for t in targets]
            self.batches.append((images.to(self.device), mask.to(self.device), targets))
        teacher = FrozenTeacher.load(f"{work}/teacher", self.device)
        self.tasks = {}
        for mode in MODES:
            cfg = resolve_config(
                {
                    "model": {"preset": args["student"], **args["model"]},
                    "train": {"progress": False, "seed": seed},
                    "data": {"max_size": args["size"], "pad_to": "batch", "pad_multiple": 64},
                    "distill": {"method": "none" if mode == "plain" else "clockdistill", "teacher": f"{work}/teacher"},
                }
            )
            torch.manual_seed(seed)
            d = Distiller(teacher, build_detector(cfg.model, ds.num_classes), cfg).to(self.device)
            if mode in ("shared", "apart"):
                d.exchange = RayExchange.connect("lockstep-bench", self.device)
            d.model.train()
            self.tasks[mode] = (d, torch.optim.AdamW([p for _, p in d.parameters_to_train()], lr=1e-5))
        self.amp = self.device.type == "cuda"

    def ready(self) -> bool:
        return True

    def run(self, mode: str, round_: int) -> tuple[list[float], float]:
        d, opt = self.tasks[mode]
        if d.shared is not None:  # each round's outputs are computed afresh; apart: no key in common
            d.shared.teacher_id = f"round {round_}" + (f" trial {self.seed}" if mode == "apart" else "")
        times = []
        for k, (images, mask, targets) in enumerate(self.batches):
            t0 = time.perf_counter()
            self.step_fn(d, opt, images, mask, targets, self.amp)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if k:
                times.append(time.perf_counter() - t0)
        shared = d.extra_metrics({}).get("teacher_shared", 0.0) if d.shared is not None else 0.0
        return times, shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2, help="trials sharing the teacher")
    ap.add_argument("--teacher", default="deformable-detr-r50")
    ap.add_argument("--student", default="deformable-detr-r18")
    ap.add_argument("--size", type=int, default=320, help="longest image side")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--enc-layers", default="", help="each trial's student encoder layers (default: the preset's)")
    args = ap.parse_args()
    layers = [int(v) for v in args.enc_layers.split(",")] if args.enc_layers else []
    if layers and len(layers) != args.k:
        ap.error(f"--enc-layers: one value per trial ({args.k}), got {len(layers)}")

    from clockdistill.checkpoint import save_checkpoint
    from clockdistill.config.layers import resolve_config
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.synth import write_synthetic
    from clockdistill.data.transforms import DetectionTransform
    from clockdistill.distill.teacher import FrozenTeacher
    from clockdistill.models.build import build_detector
    from sweeps.tune.exchange import start_hub

    work = Path(tempfile.mkdtemp(prefix="lockstep-"))
    data = write_synthetic(work / "data", args.batch * (args.steps + 1), 1, seed=0, progress=False)
    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": args.teacher}})
    ds = CocoDetection(data, "train", DetectionTransform(args.size, train=False))
    teacher = FrozenTeacher(build_detector(tcfg.model, ds.num_classes))
    save_checkpoint(work / "teacher", teacher.detector, {"config": tcfg.to_dict(), "class_names": ds.class_names})

    gpu = 1.0 / args.k if args.device == "cuda" else 0
    ray.init(num_cpus=max(args.k, 1), num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="ERROR")
    hub = start_hub("lockstep-bench")  # noqa: F841 (held while the trials run)
    trials = [
        Trial.options(num_cpus=1, num_gpus=gpu).remote(
            str(work), str(data), {**vars(args), "model": {"enc_layers": layers[i]} if layers else {}}, i
        )
        for i in range(args.k)
    ]
    ray.get([t.ready.remote() for t in trials])
    times: dict[str, list[float]] = {m: [] for m in MODES}
    per_trial: dict[tuple[str, int], list[float]] = {(m, i): [] for m in MODES for i in range(args.k)}
    shared: list[float] = []
    for r in range(args.rounds):
        for mode in MODES:
            for i, (step_times, frac) in enumerate(ray.get([t.run.remote(mode, r) for t in trials])):
                times[mode] += step_times
                per_trial[mode, i] += step_times
                if mode == "shared":
                    shared.append(frac)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {statistics.median(times[m]):.3f}s" for m in MODES))
    plain = statistics.median(times["plain"])
    print(
        f"\n{args.k} trials, {args.teacher} -> {args.student}, {args.size}px, batch {args.batch}, {args.device}; "
        f"median of {len(times['plain'])} steps per mode"
    )
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"  {mode:7s} {med:.3f} s/step  {med / plain:.3f}x a plain step")
    print(f"  teacher outputs taken from a peer: {statistics.mean(shared):.2f}")
    if layers:
        for i in range(args.k):
            plain_i = statistics.median(per_trial["plain", i])
            cells = ", ".join(f"{m} {statistics.median(per_trial[m, i]) / plain_i:.3f}x" for m in MODES[1:])
            taken = statistics.mean(shared[i :: args.k])
            print(f"  trial {i} (enc_layers {layers[i]}): plain {plain_i:.3f} s/step, {cells}, taken {taken:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
