"""Benchmark: the cost of one distillation training step against one plain student step, same batch.

    python tests/bench/step_cost.py [--device cpu|cuda] [--teacher hybrid-tiny-teacher --student hybrid-tiny-student]
                                    [--batch 8] [--size 128] [--repeats 10]
                                    [--layout canvas|image] [--memory full|sampled] [--dtype fp16|int8]

Every variant runs the full step (forward, losses, backward, optimizer step) on the same batch; the
variants are interleaved round-robin and each reports its median, so machine noise hits all alike.
Ratios are to the plain student step (method none). The teacher forward and the extra decoder
passes are also timed on their own. "+cache" variants read the teacher's outputs from the teacher
cache (built first, memory-mapped, as a sweep's trials read it): their limit is 1.0 plus the
student's extra decoder pass. On CUDA the steps run in bf16 autocast. Batches use the fixed
max_size canvas (--layout canvas) or the batch's largest image rounded to the teacher's largest
stride (--layout image: the cache keyed by image), for every variant; --memory sampled reads the
compact cache (the boxes' tokens and 512 background tokens per image, fp16 or int8).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import device_sync, fixed_batch, interleaved_medians, training_step  # tests/bench/timing.py

from clockdistill.checkpoint import save_checkpoint
from clockdistill.config.layers import resolve_config
from clockdistill.distill.cache import prepare_teacher_cache
from clockdistill.distill.distiller import Distiller
from clockdistill.distill.student_pass import target_queries
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.models.build import build_detector

VARIANTS = ("none", "memory_only", "logit_only", "clockdistill", "vanilla_kd", "fitnet")
CACHED = ("clockdistill", "vanilla_kd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default="hybrid-tiny-teacher", help="teacher preset")
    ap.add_argument("--student", default="hybrid-tiny-student", help="student preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="longest image side")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--data", default=None, help="COCO-format data set (default: a small synthetic one in a temp dir)")
    ap.add_argument("--layout", choices=("canvas", "image"), default="canvas", help="the cache's row layout")
    ap.add_argument("--memory", choices=("full", "sampled"), default="full", help="the cached memory")
    ap.add_argument("--dtype", choices=("fp16", "int8"), default="fp16", help="sampled memory's values")
    args = ap.parse_args()
    data_keys = {"pad_to": "max_size"} if args.layout == "canvas" else {"pad_to": "batch", "pad_multiple": 64}
    device = torch.device(args.device)
    multiple = 64 if args.layout == "image" else 0
    ds, images, mask, targets = fixed_batch(args.data, args.batch, args.size, device, "step-cost-", multiple)
    amp = device.type == "cuda"

    torch.manual_seed(0)
    tcfg = resolve_config({"model": {"preset": args.teacher}})
    teacher = FrozenTeacher(build_detector(tcfg.model, ds.num_classes)).to(device)
    work = Path(tempfile.mkdtemp(prefix="step-cost-cache-"))
    save_checkpoint(work / "teacher", teacher.detector, {"config": tcfg.to_dict(), "class_names": ds.class_names})
    distillers = {}
    for method in (*VARIANTS, *(f"{m}+cache" for m in CACHED)):
        name = method.removesuffix("+cache")
        cfg = resolve_config(
            {
                "model": {"preset": args.student},
                "train": {"progress": False},
                "data": {"max_size": args.size, **data_keys, "cache_dir": str(work / "cache")},
                "distill": {
                    "method": name,
                    "teacher": str(work / "teacher"),
                    "teacher_cache": "on",
                    "teacher_cache_memory": args.memory,
                    "teacher_cache_dtype": args.dtype,
                },
            }
        )
        torch.manual_seed(0)
        d = Distiller(teacher, build_detector(cfg.model, ds.num_classes), cfg).to(device)
        if method.endswith("+cache"):
            d.cache = prepare_teacher_cache(cfg, teacher, ds, device)
        d.model.train()
        distillers[method] = (d, torch.optim.AdamW([p for _, p in d.parameters_to_train()], lr=1e-5))

    sync = device_sync(device)

    def step(method):
        d, opt = distillers[method]
        training_step(d, opt, images, mask, targets, amp)

    clock = distillers["clockdistill"][0]

    def teacher_forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            teacher.encode(images, mask)

    def teacher_extra_decode():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            mem = teacher.encode(images, mask)
            qs = clock.queries.sample(targets, device)
            teacher.decode(mem, **target_queries(teacher.detector, clock.queries, qs))

    def student_passes(extra: str):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            mem = clock.model.encode(images, mask)
            own = clock.model.default_queries(mem)
            if extra == "fused":
                qs = clock.queries.sample(targets, device)
                out, target = clock._pass()._decode_fused(mem, own, target_queries(clock.model, clock.queries, qs))
                outs = [out, target[-1]]
            else:
                outs = [clock.model.decode(mem, own.content, own.reference, own.position)]
            if extra == "separate":
                qs = clock.queries.sample(targets, device)
                outs.append(clock.model.decode(mem, **target_queries(clock.model, clock.queries, qs)))
        sum(o["pred_logits"].float().sum() + o["pred_boxes"].float().sum() for o in outs).backward()

    def unfused_step():
        clock.fuse_decoder = False
        try:
            step("clockdistill")
        finally:
            clock.fuse_decoder = True

    jobs = {
        **{m: (lambda m=m: step(m)) for m in distillers},
        "teacher encode (no grad)": teacher_forward,
        "teacher encode + extra decode (no grad)": teacher_extra_decode,
        "clockdistill, two decoder passes": unfused_step,
        "student fwd+bwd": lambda: student_passes("none"),
        "student fwd+bwd + separate extra pass": lambda: student_passes("separate"),
        "student fwd+bwd + fused extra queries": lambda: student_passes("fused"),
    }
    for _ in range(2):  # warm-up
        for fn in jobs.values():
            fn()
    med = interleaved_medians(jobs, args.repeats, sync)
    base = med["none"]
    n_gt = sum(len(t["labels"]) for t in targets)
    print(
        f"# {args.teacher} -> {args.student}, batch {args.batch} at {args.size}px ({n_gt} GT boxes, "
        f"{clock.dcfg.logit.groups} query groups), {device}{' bf16' if amp else ' fp32'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'step / part':<42} {'ms':>9} {'/ plain step':>13}")
    for name, t in med.items():
        print(f"{name:<42} {t * 1000:>9.1f} {t / base:>13.3f}")
    extra = med["student fwd+bwd + fused extra queries"] - med["student fwd+bwd"]
    extra_separate = med["student fwd+bwd + separate extra pass"] - med["student fwd+bwd"]
    print(
        f"\ndistillation step / plain step, live teacher: {med['clockdistill'] / base:.3f} (CLoCKDistill), "
        f"{med['vanilla_kd'] / base:.3f} (vanilla KD)"
    )
    print(
        "  bound 1.0 + teacher forward + student extra pass: "
        f"{1 + (med['teacher encode + extra decode (no grad)'] + max(extra, 0)) / base:.3f}"
    )
    print(
        f"distillation step / plain step, teacher cache: {med['clockdistill+cache'] / base:.3f} (CLoCKDistill), "
        f"{med['vanilla_kd+cache'] / base:.3f} (vanilla KD); target <= 1.15"
    )
    print(
        f"  limit 1.0 + student extra queries: {1 + max(extra, 0) / base:.3f} fused into the student's decoder pass "
        f"(as a separate pass: {1 + max(extra_separate, 0) / base:.3f})"
    )


if __name__ == "__main__":
    main()
