"""Training and evaluation loops.

`fit` trains a `TrainingTask`: anything that turns a batch into named loss terms and their weights
and holds the model to evaluate and checkpoint. `DetectionTask` is plain supervised DETR training;
the distiller is another task, so teachers, plain students and distilled students share one loop.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from clockdistill.checkpoint import load_extra, load_optimizer, load_weights, recover_checkpoint, save_checkpoint
from clockdistill.checkpoint_meta import read_meta
from clockdistill.config.sections import Config, TrainConfig
from clockdistill.data.dataset import CocoDetection
from clockdistill.data.sampler import ShardedBatchSampler
from clockdistill.data.transforms import DetectionTransform, collate
from clockdistill.distributed import (
    all_ranks,
    average_across_ranks,
    is_distributed,
    may_leave_parameters_unused,
    rank,
    world_size,
    wrap_ddp,
)
from clockdistill.errors import TrainingDiverged, UserError
from clockdistill.evaluation.coco import coco_evaluate, postprocess, to_coco_results
from clockdistill.evaluation.kitti import has_kitti_fields, kitti_evaluate
from clockdistill.losses.criterion import SetCriterion, model_detection_weights, weighted_sum
from clockdistill.metrics import EPOCH, EVAL_TIME, LOSS, LR, TRAIN_TIME
from clockdistill.models.build import build_detector
from clockdistill.weights.start import apply_starting_weights

log = logging.getLogger(__name__)


class TrainingTask(Protocol):
    """What `fit` trains. Optional extras: `extra_modules: dict[str, nn.Module]`, trained helpers
    (e.g. a distillation adapter) saved in and restored from the checkpoint beside `model`; and
    `extra_metrics(metrics) -> dict`, added to each epoch's metrics."""

    model: nn.Module  # the network that is evaluated and checkpointed

    def parameters_to_train(self) -> list[tuple[str, nn.Parameter]]: ...

    def distribute(self, device: torch.device) -> None:
        """Wrap what trains in DistributedDataParallel (called by `fit` in a data-parallel run)."""

    def losses(
        self, images: Tensor, mask: Tensor, targets: list[dict]
    ) -> tuple[dict[str, Tensor], dict[str, float]]: ...


class DetectionTask:
    """Plain supervised training of one detector (teachers and no-KD students)."""

    def __init__(self, model: nn.Module, criterion: SetCriterion, weights: dict[str, float]):
        self.model, self.criterion, self.weights = model, criterion, weights
        self.forward_module = model  # DDP-wrapped in data-parallel runs

    def parameters_to_train(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def distribute(self, device: torch.device) -> None:
        unused = may_leave_parameters_unused(self.model, self.criterion.aux_loss)
        self.forward_module = wrap_ddp(self.model, device, find_unused_parameters=unused)

    def losses(self, images, mask, targets):
        return self.criterion(self.forward_module(images, mask, targets=targets), targets), self.weights


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name} requested but CUDA is not available (use auto or cpu)")
    return torch.device(name)


def build_datasets(cfg: Config) -> tuple[CocoDetection, CocoDetection]:
    if not cfg.data.root:
        raise UserError("data.root: no data set given (set data.root=DIR, a COCO-format directory)")
    d = cfg.data
    train = CocoDetection(d.root, d.train_split, DetectionTransform.for_data(d, True), cfg.train.seed)
    val = CocoDetection(d.root, d.val_split, DetectionTransform.for_data(d, False))
    if d.decoded_cache:  # a file another trial is decoding is not waited for (see set_epoch)
        for ds in (train, val):
            ds.use_decoded_cache(d.cache_dir, cfg.train.progress, wait=False)
    return train, val


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the backbone at its own lr, deformable attention's sampling offsets and the reference-point
    layer at lr x lr_linear_proj_mult; no weight decay on norms, biases and embeddings."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named_params:
        lr = cfg.lr_backbone if ".backbone." in f".{name}" else cfg.lr
        if ".sampling_offsets." in f".{name}" or ".reference_points." in f".{name}":
            lr = cfg.lr * cfg.lr_linear_proj_mult
        decay = 0.0 if (p.ndim <= 1 or "query_" in name or "level_embed" in name) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to min_lr_ratio or x0.1 steps at lr_drop_epochs."""
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    if cfg.schedule == "step":
        epoch = step // max(iters_per_epoch, 1)
        return warm * 0.1 ** sum(epoch >= e for e in cfg.lr_drop_epochs)
    progress = min(1.0, step / max(total, 1))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_device(images: Tensor, mask: Tensor, targets: list[dict], device: torch.device, channels_last: bool = False):
    nb = device.type == "cuda"  # pinned host memory (the loaders pin on CUDA) lets these copies overlap compute
    images = images.to(
        device, non_blocking=nb, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    mask = mask.to(device, non_blocking=nb)
    targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, mask, targets


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int = 16,
    amp: bool = True,
    progress: bool = False,
    canvas: tuple[int, int] | None = None,
    num_workers: int = 0,
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO-format detections of `model` on a whole split, and the split's image ids (batches padded
    to `canvas` when given; decoded by `num_workers` loader processes, pinned for a GPU)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=functools.partial(collate, pad_to=canvas),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    results, image_ids = [], []
    for images, mask, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images, mask, _ = _to_device(images, mask, [], device)
        with _autocast(device, amp):
            outputs = model(images, mask)
        orig = torch.stack([t["orig_size"] for t in targets])
        ids = [t["image_id"] for t in targets]
        results += to_coco_results(postprocess(outputs, orig), ids, dataset.label_to_cat)
        image_ids += ids
    model.train(was_training)
    return results, image_ids


def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int = 16,
    amp: bool = True,
    progress: bool = False,
    canvas: tuple[int, int] | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """COCO metrics of `model` on a whole split (batches padded to `canvas` when given), and KITTI's own
    (evaluation/kitti.py) when the split was converted by `clockdistill data kitti`."""
    results, image_ids = predict(model, dataset, device, batch_size, amp, progress, canvas, num_workers)
    return split_metrics(dataset.ground_truth, results, image_ids)


def split_metrics(ground_truth: dict, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """COCO metrics of COCO results, and KITTI's when the annotations carry its fields."""
    metrics = coco_evaluate(ground_truth, results, image_ids)
    if has_kitti_fields(ground_truth):
        metrics.update(kitti_evaluate(ground_truth, results, image_ids))
    return metrics


def train_one_epoch(
    task: TrainingTask,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    total_steps: int,
    params: list[nn.Parameter],
) -> tuple[dict[str, float], int]:
    """One pass over `loader`. Returns the epoch's mean of every loss term (and the weighted total
    under "loss"), and the global step after it."""
    task.model.train()
    names: list[str] = []
    sums: Tensor | None = None  # running sums on the device: one host sync per step (the finiteness check)
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
    for images, mask, targets in bar:
        images, mask, targets = _to_device(images, mask, targets, device, cfg.channels_last)
        factor = lr_factor(step, total_steps, len(loader), cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        terms, weights, loss = _step_losses(task, images, mask, targets, device, cfg, f"epoch {epoch + 1}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_max_norm)
        optimizer.step()
        step += 1
        n += 1
        if not names:
            names = [LOSS, *terms]
        elif names[1:] != list(terms):
            raise RuntimeError(f"loss terms changed between steps: {names[1:]} -> {list(terms)}")
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
        sums = values if sums is None else sums + values
        if cfg.progress and (n % 10 == 1 or n == len(loader)):
            bar.set_postfix(loss=f"{sums[0].item() / n:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = average_across_ranks(sums / max(n, 1)).tolist() if sums is not None else []
    return dict(zip(names, means)), step


def _step_losses(task: TrainingTask, images, mask, targets, device: torch.device, cfg: TrainConfig, where: str):
    """(terms, weights, weighted loss) of one step, or TrainingDiverged on every rank at once: in a
    data-parallel run the ranks agree on whether the step is finite (one all-reduce of a flag) before
    any of them starts the backward pass, whose gradient all-reduce would otherwise leave the healthy
    ranks waiting for the diverged one until the collective's timeout."""
    reason = None
    try:
        with _autocast(device, cfg.amp):
            terms, weights = task.losses(images, mask, targets)
        loss = weighted_sum(terms, weights)
        finite = torch.isfinite(loss)
    except TrainingDiverged as exc:  # the matcher or the distiller found non-finite predictions
        if not is_distributed():
            raise
        reason, finite = f"{exc} ({where})", torch.zeros((), dtype=torch.bool, device=device)
    if not all_ranks(finite):
        if reason is None and not bool(finite):
            bad = sorted(k for k, v in terms.items() if not torch.isfinite(v))
            reason = f"loss is {loss.item()} at {where} (non-finite terms: {bad})"
        raise TrainingDiverged(
            (f"rank {rank()}: " + reason if is_distributed() else reason)
            if reason
            else f"the loss of another rank is not finite at {where}"
        )
    return terms, weights, loss


def train_loader(train_ds: CocoDetection, cfg: Config, device: torch.device, generator: torch.Generator) -> DataLoader:
    """Shuffled batches padded to the data section's canvas; in a data-parallel run this rank's
    share of each global batch of train.batch_size. Workers are not persistent: each epoch's workers
    get the dataset as it is then (its epoch, which seeds the augmentation, and any decoded-image
    file finished since); persistent workers kept the first epoch's copy, so every epoch saw the
    same flips and sizes."""
    tc = cfg.train
    sampler = ShardedBatchSampler(
        len(train_ds), tc.batch_size, len(train_ds) > tc.batch_size, generator, world_size(), rank()
    )
    return DataLoader(
        train_ds,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, pad_to=cfg.data.canvas, multiple=cfg.data.pad_multiple),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def accelerate(task: TrainingTask, tc: TrainConfig) -> None:
    """Apply the train section's speed switches to the task's networks (student and, when there is
    one, teacher): channels-last weights, and torch.compile of the encoder and decoder. Compiling the
    methods, not the module, keeps parameter names (checkpoints) unchanged."""
    models = [m for m in (task.model, getattr(task, "teacher", None)) if m is not None]
    if tc.channels_last:
        for m in models:
            m.to(memory_format=torch.channels_last)
    if tc.compile != "off":
        mode = None if tc.compile == "default" else tc.compile
        for m in models:
            net = getattr(m, "detector", m)  # FrozenTeacher wraps its detector
            # input sizes vary (multi-scale training, aspect ratios) and query counts with the GT: dynamic
            # shapes, one graph for all; each model its own copy of the code, so that the teacher (under
            # no_grad) and the student (a detector class they may share) do not share one compile cache
            net.encode = torch.compile(_own_code(net, "encode"), mode=mode, dynamic=True)
            net.decode = torch.compile(_own_code(net, "decode"), mode=mode, dynamic=True)
        log.info("torch.compile (%s) of encoder and decoder: the first steps compile", tc.compile)


def _own_code(net: nn.Module, name: str):
    """net.<name> bound to `net` as a function with a code object of its own: torch.compile keeps its
    graphs and its recompile budget per code object, which every instance of a class shares."""
    import types

    f = getattr(type(net), name)
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(copy, net)


@dataclass
class FitResult:
    output_dir: Path
    best_ap: float
    best_epoch: int
    last_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[int, dict[str, float], Path], Any]


@dataclass
class RunState:
    """Where a training run stands: what each checkpoint's metadata records and a resume restores."""

    epoch: int = 0  # the next epoch to train (0-based)
    step: int = 0
    best_ap: float = -1.0
    best_epoch: int = -1  # 1-based, as reported
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def restore(cls, last: Path, task: TrainingTask, extra: dict, optimizer, device: torch.device) -> "RunState":
        """The weights, helper modules and optimizer of `last` into the run, and its state."""
        meta = read_meta(last)
        load_weights(last, task.model, device)
        load_extra(last, extra, device)
        load_optimizer(last, optimizer, meta)
        log.info("resumed from %s at epoch %d", last, meta["epoch"] + 2)
        return cls(meta["epoch"] + 1, meta["step"], meta.get("best_ap", -1.0), meta.get("best_epoch", -1),
                   meta.get("history", []))  # fmt: skip

    def meta(self, base: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
        """A checkpoint's metadata after the epoch just trained (self.epoch)."""
        return {**base, "epoch": self.epoch, "step": self.step, "metrics": metrics, "best_ap": self.best_ap,
                "best_epoch": self.best_epoch, "history": self.history}  # fmt: skip


def detection_task(cfg: Config, device: torch.device) -> DetectionTask:
    """Plain supervised training of a fresh detector of cfg.model (its class count set)."""
    model = build_detector(cfg.model, cfg.model.num_classes).to(device)
    criterion = SetCriterion.from_config(cfg.loss, cfg.model.num_classes)
    return DetectionTask(model, criterion, model_detection_weights(cfg.loss, cfg.model))


def _distribute(task: TrainingTask, device: torch.device, batch_size: int) -> None:
    task.distribute(device)
    log.info(
        "data-parallel training: rank %d of %d, %d images per rank and step",
        rank(),
        world_size(),
        batch_size // world_size(),
    )


def _train_and_evaluate(
    task: TrainingTask, cfg: Config, datasets, loader: DataLoader, optimizer, device: torch.device, state: RunState
) -> dict[str, float]:
    """One epoch (state.epoch): train, evaluate when due (rank 0), and record it in `state`."""
    tc, (train_ds, val_ds), epoch = cfg.train, datasets, state.epoch
    t0 = time.perf_counter()
    train_ds.set_epoch(epoch)
    val_ds.set_epoch(epoch)
    params = [p for _, p in task.parameters_to_train()]  # in their named order, as clipping sums their norms
    total_steps = tc.epochs * len(loader)
    losses, state.step = train_one_epoch(task, loader, optimizer, device, tc, epoch, state.step, total_steps, params)
    metrics = {EPOCH: epoch + 1, LR: optimizer.param_groups[0]["lr"], TRAIN_TIME: time.perf_counter() - t0, **losses}
    if hasattr(task, "extra_metrics"):
        metrics.update(task.extra_metrics(metrics))
    if rank() == 0 and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs):
        t1 = time.perf_counter()
        canvas, workers = cfg.data.canvas, cfg.data.num_workers
        metrics.update(evaluate(task.model, val_ds, device, tc.batch_size * 2, tc.amp, tc.progress, canvas, workers))
        metrics[EVAL_TIME] = time.perf_counter() - t1
        if metrics["AP"] > state.best_ap:
            state.best_ap, state.best_epoch = metrics["AP"], epoch + 1
    state.history.append(metrics)
    return metrics


def fit(
    cfg: Config,
    task: TrainingTask | None = None,
    on_epoch_end: EpochCallback | None = None,
    datasets: tuple[CocoDetection, CocoDetection] | None = None,
) -> FitResult:
    """Train for cfg.train.epochs, evaluating every eval_every epochs.

    Writes `<output_dir>/last` every epoch and `<output_dir>/best` when the validation AP improves;
    resumes from `last` when train.resume is on (a fresh run first gets its starting weights:
    weights/start.py). `on_epoch_end(epoch, metrics, checkpoint_dir)` gets every loss term, the lr
    and the COCO metrics (on evaluated epochs) after each epoch; returning True stops training early.
    """
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = select_device(tc.device)
    train_ds, val_ds = datasets or build_datasets(cfg)
    if cfg.model.num_classes == 0:  # a new config: the caller's stays as it is
        cfg = cfg.updated({"model.num_classes": train_ds.num_classes})
    task = task or detection_task(cfg, device)
    out = Path(tc.output_dir)
    resuming = tc.resume and recover_checkpoint(out / "last")
    if not resuming:  # a resumed run has its own weights
        apply_starting_weights(task.model, cfg, train_ds.class_names, getattr(task, "teacher", None))
    extra = dict(getattr(task, "extra_modules", {}) or {})
    accelerate(task, tc)
    main = rank() == 0  # data-parallel runs: rank 0 evaluates and writes checkpoints
    if is_distributed():
        _distribute(task, device, tc.batch_size)
    optimizer = build_optimizer(task.parameters_to_train(), tc)
    out.mkdir(parents=True, exist_ok=True)
    state = RunState.restore(out / "last", task, extra, optimizer, device) if resuming else RunState()
    shuffle_rng = torch.Generator()  # re-seeded per epoch: a resumed run sees the same order
    loader = train_loader(train_ds, cfg, device, shuffle_rng)
    base_meta = {"config": cfg.to_dict(), "class_names": train_ds.class_names, "label_to_cat": train_ds.label_to_cat}
    metrics: dict[str, float] = state.history[-1] if state.history else {}
    for epoch in range(state.epoch, tc.epochs):
        state.epoch = epoch
        shuffle_rng.manual_seed(tc.seed * 1000 + epoch)
        metrics = _train_and_evaluate(task, cfg, (train_ds, val_ds), loader, optimizer, device, state)
        if main and state.best_epoch == epoch + 1:
            save_checkpoint(out / "best", task.model, state.meta(base_meta, metrics), extra=extra)
        if main:
            save_checkpoint(out / "last", task.model, state.meta(base_meta, metrics), optimizer, extra=extra)
        log.info(
            "epoch %d/%d loss %.4f%s (%.1fs)",
            epoch + 1,
            tc.epochs,
            metrics[LOSS],
            f" AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}" if "AP" in metrics else "",
            metrics[TRAIN_TIME],
        )
        if on_epoch_end is not None and on_epoch_end(epoch + 1, metrics, out / "last"):
            log.info("stopped early by the epoch callback after epoch %d", epoch + 1)
            break
    return FitResult(out, state.best_ap, state.best_epoch, metrics, state.history)
