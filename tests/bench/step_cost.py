"""Benchmark: the cost of one distillation training step against one plain student step, same batch.

    python tests/bench/step_cost.py [--device cpu|cuda] [--teacher tiny-teacher --student tiny-student]
                                    [--batch 8] [--size 128] [--repeats 10]

Every variant runs the full step (forward, losses, backward, optimizer step) on the same batch; the
variants are interleaved round-robin and each reports its median, so machine noise hits all alike.
Ratios are to the plain student step (method none). The teacher forward and the extra decoder
passes are also timed on their own. On CUDA the steps run in bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clockdistill.config import config_from_dict
from clockdistill.data import CocoDetection, DetectionTransform, collate
from clockdistill.data.synth import write_synthetic
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models import build_detector

VARIANTS = ("none", "memory_only", "logit_only", "clockdistill", "vanilla_kd", "fitnet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default="tiny-teacher", help="teacher preset")
    ap.add_argument("--student", default="tiny-student", help="student preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="longest image side")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--data", default=None, help="COCO-format data set (default: a small synthetic one in a temp dir)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.data is None:
        import tempfile

        args.data = str(write_synthetic(tempfile.mkdtemp(prefix="step-cost-"), args.batch, 1, seed=0, progress=False))
    ds = CocoDetection(args.data, "train", DetectionTransform(args.size, train=False))
    images, mask, targets = collate([ds[i % len(ds)] for i in range(args.batch)])
    images, mask = images.to(device), mask.to(device)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    amp = device.type == "cuda"

    torch.manual_seed(0)
    tcfg = config_from_dict({"model": {"preset": args.teacher}})
    teacher = FrozenTeacher(build_detector(tcfg.model, ds.num_classes)).to(device)
    distillers = {}
    for method in VARIANTS:
        cfg = config_from_dict({"model": {"preset": args.student}, "distill": {"method": method}})
        torch.manual_seed(0)
        d = Distiller(teacher, build_detector(cfg.model, ds.num_classes), cfg).to(device)
        d.model.train()
        distillers[method] = (d, torch.optim.AdamW([p for _, p in d.parameters_to_train()], lr=1e-5))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(method):
        d, opt = distillers[method]
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            terms, weights = d.losses(images, mask, targets)
        loss = sum(weights[k] * v for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    clock = distillers["clockdistill"][0]

    def teacher_forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            teacher.encode(images, mask)

    def teacher_extra_decode():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            mem = teacher.encode(images, mask)
            qs = clock.queries.sample(targets, device)
            teacher.decode(mem, **clock.queries.embed(qs, teacher.cfg.d_model))

    def student_passes(extra: bool):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            mem = clock.model.encode(images, mask)
            outs = [clock.model.decode(mem, *clock.model.default_queries(images.shape[0]))]
            if extra:
                qs = clock.queries.sample(targets, device)
                outs.append(clock.model.decode(mem, **clock.queries.embed(qs, clock.model.cfg.d_model)))
        sum(o["pred_logits"].float().sum() + o["pred_boxes"].float().sum() for o in outs).backward()

    jobs = {**{m: (lambda m=m: step(m)) for m in VARIANTS}, "teacher encode (no grad)": teacher_forward,
            "teacher encode + extra decode (no grad)": teacher_extra_decode,
            "student fwd+bwd": lambda: student_passes(False),
            "student fwd+bwd with the extra decoder pass": lambda: student_passes(True)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(2):  # warm-up
        for fn in jobs.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["none"]
    n_gt = sum(len(t["labels"]) for t in targets)
    print(f"# {args.teacher} -> {args.student}, batch {args.batch} at {args.size}px ({n_gt} GT boxes, "
          f"{clock.dcfg.logit.groups} query groups), {device}{' bf16' if amp else ' fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'step / part':<42} {'ms':>9} {'/ plain step':>13}")
    for name, t in med.items():
        print(f"{name:<42} {t * 1000:>9.1f} {t / base:>13.3f}")
    extra = med["student fwd+bwd with the extra decoder pass"] - med["student fwd+bwd"]
    print(f"\ndistillation step / plain step: {med['clockdistill'] / base:.3f} (CLoCKDistill), {med['vanilla_kd'] / base:.3f} (vanilla KD)")
    print(f"bound 1.0 + teacher forward + student extra pass: {1 + (med['teacher encode + extra decode (no grad)'] + max(extra, 0)) / base:.3f}")


if __name__ == "__main__":
    main()
