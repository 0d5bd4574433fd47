"""The core's subcommands of `clockdistill`, one `Command` each: its arguments and what it runs.
(The sweep subcommands are in sweeps/commands.py; cli.py assembles both into one parser.)

Each `run` imports what it needs when it runs, so `--help` and a bad argument answer at once
instead of after torch (or Ray) is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from clockdistill.errors import UserError

SET_HELP = "override a config value by dotted key, e.g. --set train.epochs=3 (repeatable)"


@dataclass(frozen=True)
class Command:
    """One subcommand. `name` may have two words ("data synth": the action of a command group);
    `run(args)` returns the exit status."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --print-config, shared by the commands that build a Config."""
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as dotted keys and exit")


# -- data -----------------------------------------------------------------------------------------


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--test", type=int, default=200, help="held-out test images, which no sweep reads (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _synth(args: argparse.Namespace) -> int:
    from clockdistill.data.synth import write_synthetic

    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name}: expected a count >= 0, got {getattr(args, name)}")
    out = write_synthetic(args.out, args.train, args.val, args.seed, progress=not args.quiet, test=args.test)
    print(f"wrote {args.train} train, {args.val} val and {args.test} test images to {out}")
    return 0


def _kitti_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kitti", required=True, help="KITTI object directory (holding training/label_2 and training/image_2)"
    )
    p.add_argument("--out", required=True, help="output COCO-format directory")
    p.add_argument(
        "--train-ids", help="file with one training image id per line (default: ImageSets/train.txt, else 4 of 5 ids)"
    )
    p.add_argument("--val-ids", help="file with one validation image id per line")
    p.add_argument(
        "--test-ids",
        help="file with the held-out test ids (default: ImageSets/test.txt when its ids are labelled and not in "
        "train or val, else every second id of the val list, which keeps the others)",
    )
    p.add_argument(
        "--map-similar", action="store_true", help="map Van -> Car and Person_sitting -> Pedestrian instead of ignoring"
    )
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")


def _kitti(args: argparse.Namespace) -> int:
    from clockdistill.data.kitti import convert_kitti

    counts = convert_kitti(
        args.kitti, args.out, args.train_ids, args.val_ids, args.map_similar, args.copy, args.test_ids
    )
    print(", ".join(f"{counts[s]} {s}" for s in ("train", "val", "test")) + f" images written to {args.out}")
    return 0


def _coco_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", required=True, help="COCO 2017 directory (annotations/, train2017/, val2017/)")
    p.add_argument("--out", required=True, help="output directory (annotations written, image directories linked)")
    p.add_argument(
        "--val", type=int, default=5000, help="train2017 images drawn as the validation split (default 5000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that draw (default 0)")


def _coco(args: argparse.Namespace) -> int:
    from clockdistill.data.coco_splits import split_coco

    counts = split_coco(args.coco, args.out, args.val, args.seed)
    print(", ".join(f"{counts[s]} {s}" for s in ("train", "val", "test")) + f" images written to {args.out}")
    return 0


def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="COCO-format data set directory")
    p.add_argument("--split", action="append", help="split to index (repeatable; default train and val)")


def _index(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from clockdistill.data.index import build_index

    for split in args.split or ["train", "val"]:
        t0 = time.perf_counter()
        path = build_index(args.dataset, split)
        print(f"{split}: {pq.read_metadata(path).num_rows} images -> {path} ({time.perf_counter() - t0:.2f}s)")
    return 0


# -- one detector -----------------------------------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="fine-tune this checkpoint: its architecture unless model.* says otherwise; every tensor the "
        "detector shares is copied; class heads are copied for the same classes, mapped by name (or "
        "--class-map) for others, fresh where no class matches",
    )
    p.add_argument(
        "--class-map", metavar="FILE", help="with --init-from: YAML/JSON mapping new class names to the checkpoint's"
    )


def _train(args: argparse.Namespace) -> int:
    from clockdistill.config.layers import resolve_config
    from clockdistill.engine import fit

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    if args.class_map:
        overrides.append(f"train.class_map={args.class_map}")
    cfg = resolve_config(args.config, overrides=overrides)
    if args.print_config:
        print(json.dumps(cfg.flatten(), indent=1))
        return 0
    result = fit(cfg)
    summary = {"output_dir": str(result.output_dir), "best_AP": result.best_ap, "best_epoch": result.best_epoch}
    summary.update({k: result.last_metrics[k] for k in ("AP", "AP50", "AP75") if k in result.last_metrics})
    print(json.dumps(summary, indent=1))
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hugging Face model directory, or a .pth / .safetensors checkpoint file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--data", help="COCO-format data set: give the class heads its classes (rows taken by class name)")
    p.add_argument(
        "--class-map", metavar="FILE", help="with --data: YAML/JSON mapping its class names to the checkpoint's"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model setting the checkpoint does not hold, e.g. --set model.nheads=8 (repeatable); read before "
        "the architecture is taken from the tensors",
    )


def _import(args: argparse.Namespace) -> int:
    from clockdistill.weights.importer import import_checkpoint

    if args.class_map and not args.data:
        raise UserError("--class-map: needs --data (the data set whose classes the heads are given)")
    import_checkpoint(args.source, args.out, args.data, args.class_map, args.overrides)
    return 0


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (or distill.teacher in the config)")
    config_arguments(p)


def _distill(args: argparse.Namespace) -> int:
    from clockdistill.config.layers import resolve_config
    from clockdistill.distill.run import run_distillation
    from clockdistill.metrics import LOSS_PARTS, TEACHER_AP

    cfg = resolve_config(args.config, overrides=args.overrides, distill=True, teacher=args.teacher)
    if args.print_config:
        print(json.dumps(cfg.flatten(), indent=1))
        return 0

    def report(epoch: int, metrics: dict, _ckpt) -> None:
        ap = f"AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f} | " if "AP" in metrics else ""
        parts = " ".join(f"{k.removeprefix('loss_')} {metrics[k]:.4f}" for k in LOSS_PARTS if k in metrics)
        print(f"epoch {epoch}/{cfg.train.epochs}: {ap}weighted loss: {parts}", flush=True)

    result = run_distillation(cfg, on_epoch_end=report)
    summary = {
        "output_dir": str(result.output_dir),
        "method": cfg.distill.method,
        "best_AP": result.best_ap,
        "best_epoch": result.best_epoch,
        TEACHER_AP: result.teacher_ap,
    }
    summary.update({k: result.last_metrics[k] for k in ("AP", "AP50", "AP75") if k in result.last_metrics})
    print(json.dumps(summary, indent=1))
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (holding model.safetensors and meta.json)")
    p.add_argument("--data", required=True, help="COCO-format data set directory")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--kitti-results",
        metavar="DIR",
        help="also write the detections in KITTI's result format (one <image>.txt per image, original image "
        "coordinates, 2-D fields only) for the official devkit or server",
    )


def _evaluate(args: argparse.Namespace) -> int:
    from clockdistill.checkpoint import load_detector
    from clockdistill.config.layers import resolve_config
    from clockdistill.data.dataset import CocoDetection
    from clockdistill.data.transforms import DetectionTransform
    from clockdistill.engine import predict, select_device, split_metrics
    from clockdistill.evaluation.kitti import format_kitti, has_kitti_fields, write_kitti_results

    device = select_device(args.device)
    model, meta = load_detector(args.checkpoint, device)
    data = resolve_config(meta["config"]).data
    dataset = CocoDetection(args.data, args.split, DetectionTransform.for_data(data, train=False))
    if dataset.class_names != meta["class_names"]:
        raise UserError(
            f"--data {args.data}: classes {dataset.class_names} differ from the checkpoint's {meta['class_names']}"
        )
    results, image_ids = predict(model, dataset, device, args.batch_size, progress=not args.quiet, canvas=data.canvas)
    ground_truth = dataset.ground_truth
    metrics = split_metrics(ground_truth, results, image_ids)
    print(json.dumps(metrics, indent=1))
    if has_kitti_fields(ground_truth):
        print(format_kitti(metrics), file=sys.stderr)
    if args.kitti_results:
        n = write_kitti_results(ground_truth, results, args.kitti_results)
        print(f"wrote {n} KITTI result files to {args.kitti_results}", file=sys.stderr)
    return 0


COMMANDS = (
    Command(
        "data synth",
        "write a synthetic COCO-format data set",
        _synth_arguments,
        _synth,
        "Write coloured shapes on textured backgrounds as a COCO-format data set (images/<split>/*.png, "
        "annotations/instances_<split>.json). Deterministic per seed.",
    ),
    Command(
        "data kitti",
        "convert KITTI object labels to COCO format",
        _kitti_arguments,
        _kitti,
        "Convert KITTI 2-D object labels (training/label_2, training/image_2) to COCO format with classes Car, "
        "Pedestrian, Cyclist. Van and Person_sitting become ignore regions (or Car/Pedestrian with --map-similar), "
        "DontCare becomes ignore regions, Truck/Tram/Misc are dropped.",
    ),
    Command(
        "data coco",
        "COCO 2017 as train / val / test: a slice of train2017 selects, val2017 is the held-out test split",
        _coco_arguments,
        _coco,
        "Write COCO 2017 as this project's three splits: train2017 without a seeded random slice as train, that "
        "slice as val (what sweeps select on), val2017 as test (held out: what best-student reports on, and what "
        "published COCO figures are measured on). Annotation files are written, image directories symlinked.",
    ),
    Command(
        "data index",
        "build the Parquet annotation index of a data set",
        _index_arguments,
        _index,
        "Validate the annotation files and write their Parquet index (reused by every loader, rebuilt when the "
        "annotation file changes).",
    ),
    Command(
        "train",
        "train or fine-tune one detector (a teacher, or a student without distillation)",
        _train_arguments,
        _train,
        "Train one detector from a YAML config (sections data, model, loss, train) with dotted overrides, in the "
        "order clockdistill/config/layers.py gives. Resumes from <train.output_dir>/last when it exists.",
        "example (a COCO teacher fine-tuned to KITTI): clockdistill train --init-from teachers/coco-r50 "
        "--class-map kitti-from-coco.yaml --set data.root=kitti-coco",
    ),
    Command(
        "import",
        "convert a published Deformable DETR / DAB-DETR / DINO checkpoint into a clockdistill checkpoint",
        _import_arguments,
        _import,
        "Read a Hugging Face model directory (DeformableDetrForObjectDetection: plain, box refinement, two-stage; "
        "DabDetrForObjectDetection; config.json + model.safetensors) or an original repository's .pth checkpoint "
        "(fundamentalvision/Deformable-DETR, IDEA-Research/DAB-DETR, IDEA-Research/DINO 4/5-scale; read with the "
        "weights-only loader) and write a clockdistill checkpoint (model.safetensors + meta.json). The architecture "
        "comes from config.json or the training args; what a checkpoint without them does not tell (heads versus "
        "sampling points, dilation, a two-stage query count) is asked for by name: give it with --set. Every "
        "tensor is accounted for; a checkpoint that does not fit stops with one line and writes nothing.",
        "example: clockdistill import downloads/deformable-detr --out teachers/coco-r50 (with --data DIR the class "
        "heads are cut to that data set's classes, by name or --class-map)",
    ),
    Command(
        "distill",
        "train one student against a teacher with one distillation setting",
        _distill_arguments,
        _distill,
        "Train one student with CLoCKDistill or a baseline (distill.method: clockdistill, none, vanilla_kd, "
        "detrdistill, fitnet, memory_only, logit_only): the call a sweep trial makes. Data settings left out come "
        "from the teacher's checkpoint, and the student preset from the teacher's (hybrid-tiny-teacher -> "
        "hybrid-tiny-student). Prints the loss formula, a line per epoch and a JSON summary; resumes from "
        "<train.output_dir>/last.",
        "example: clockdistill distill --teacher runs/teacher/best --set distill.memory.alpha=1e-4 "
        "--set train.epochs=8 --set train.output_dir=runs/kd-alpha1e-4",
    ),
    Command(
        "evaluate",
        "COCO metrics of a checkpoint (and KITTI's own on KITTI data), as JSON",
        _evaluate_arguments,
        _evaluate,
        "Evaluate a checkpoint directory on a split of a COCO-format data set; prints the metrics as JSON. On a data "
        "set converted by `clockdistill data kitti` it adds KITTI's own 2-D metric as the object devkit computes it "
        "(AP|R40 and AP|R11 per class at easy / moderate / hard; Car at IoU 0.7, Pedestrian and Cyclist at 0.5) "
        "and prints its table on stderr; --kitti-results writes the detections for the official devkit.",
        "example: clockdistill evaluate --checkpoint runs/student/best --data data/kitti-coco --split test "
        "--kitti-results results/student/data",
    ),
)
