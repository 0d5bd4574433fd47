"""A run's config: nested dataclasses with visible defaults, every value checked on the way in, so
a typo or a wrong type fails with one line naming the dotted key. Configs are values (frozen).
How one is built from its sources (preset, checkpoint, file, overrides): layers.py."""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from clockdistill.config.distill import DistillConfig
from clockdistill.config.dotted import build_dataclass, flatten_dict, set_dotted
from clockdistill.config.dotted import check_choice as _check_choice
from clockdistill.config.dotted import check_range as _check_range
from clockdistill.errors import ConfigError

# The held-out split (annotations/instances_test.json): training and selection never read it; best-student
# reports the winner, the student alone and the teacher on it
TEST_SPLIT = "test"


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # COCO-format data set: annotations/instances_<split>.json + images
    train_split: str = "train"
    val_split: str = "val"
    max_size: int = 128  # longest image side after resizing (aspect ratio kept)
    train_sizes: list[int] = field(default_factory=list)  # random longest sides in training; [] = max_size
    hflip: float = 0.5  # probability of a horizontal flip in training
    num_workers: int = 0
    pad_to: str = "batch"  # batch: pad to the batch's largest image | max_size: a fixed max_size x max_size canvas
    # pad_to batch: the canvas's sides rounded up to a multiple of this (1: the reference's exact batch
    # maximum). A teacher cache keyed by image needs the teacher's largest stride (64 for 4 levels): then
    # every level's padding mask marks exactly each image's own grid
    pad_multiple: int = 1
    # longest: the longest side at max_size (train_sizes), aspect kept, padded batches | square: every image
    # stretched to max_size x max_size, each training batch scaled to one of train_sizes (RT-DETR, D-FINE)
    resize: str = "longest"
    decoded_cache: bool = False  # read resized images from a node-local Arrow file per split and size (built once)
    cache_dir: str = ""  # node-local cache directory ("" = $CLOCKDISTILL_CACHE_DIR or ~/.cache/clockdistill)

    def __post_init__(self):
        for key in ("train_split", "val_split"):
            if getattr(self, key) == TEST_SPLIT:
                raise ConfigError(
                    f"data.{key}: {TEST_SPLIT!r} is the held-out test split; training and selection never read it "
                    "(best-student reports on it)"
                )
        _check_choice("data.pad_to", self.pad_to, ("batch", "max_size"))
        _check_choice("data.resize", self.resize, ("longest", "square"))
        _check_range("data.max_size", self.max_size, low=16)
        _check_range("data.hflip", self.hflip, low=0.0, high=1.0)
        _check_range("data.num_workers", self.num_workers, low=0)
        _check_range("data.pad_multiple", self.pad_multiple, low=1)
        for i, size in enumerate(self.train_sizes):
            fixed = self.pad_to == "max_size" and self.resize == "longest"  # (square batches are scaled, not padded)
            _check_range(f"data.train_sizes[{i}]", size, low=16, high=self.max_size if fixed else None)

    @property
    def canvas(self) -> tuple[int, int] | None:
        """The fixed (H, W) every batch is padded to (the square recipe's images all are), or None (pad to
        the batch's largest image)."""
        return (self.max_size, self.max_size) if self.pad_to == "max_size" or self.resize == "square" else None


@dataclass(frozen=True)
class ModelConfig:
    """Detector architecture. `preset` fills every other field; fields given beside it win."""

    preset: str = "hybrid-tiny-teacher"
    # deformable: Deformable DETR | dab: DAB-DETR | dino: DINO (each as its reference implementation) |
    # hybrid: this project's own small DETR that trains from scratch on a CPU (models/hybrid.py)
    arch: str = "hybrid"
    box_refine: bool = False  # deformable: iterative bounding-box refinement
    two_stage: bool = False  # deformable: queries from the top-k encoder proposals (needs box_refine)
    num_classes: int = 0  # 0 = taken from the data set's categories
    backbone_depth: int = 18  # ResNet 18 | 34 | 50 | 101, in torchvision's layout
    backbone_width: float = 0.25  # channel multiplier of the ResNet (1.0 = the standard widths)
    backbone_norm: str = "batch"  # frozen: FrozenBatchNorm2d, as the references | batch: trainable (from scratch)
    backbone_frozen_stages: int = 0  # 1: stem and layer1 not trained, as the references | 0: all trained
    # ImageNet backbone a fresh run starts from (weights/start.py; never read when a checkpoint loads): a
    # torchvision-layout state dict, a Hugging Face microsoft/resnet-* directory or a clockdistill
    # checkpoint directory (its detector's backbone)
    backbone_weights: str = ""
    dilation: bool = False  # layer4 dilated instead of strided (the DC5 variants: stride 16)
    # ResNet maps the encoder reads: 3 = C3-C5 (strides 8-32) | 4 = C2-C5 (from stride 4: DINO 5-scale)
    backbone_levels: int = 3
    d_model: int = 64
    nheads: int = 4
    enc_layers: int = 2
    dec_layers: int = 3
    ffn_dim: int = 256
    dropout: float = 0.0
    num_queries: int = 30
    num_levels: int = 3  # deformable, hybrid: memory levels (strides 8, 16, 32, then 64, ...)
    n_points: int = 4  # deformable, hybrid: sampling points per head and level
    # dino: contrastive denoising queries in training. dn_number: the query budget (>= 100: groups of
    # 2 x the batch's largest box count fill 2 x dn_number slots; below 100: the group count; 0 = none)
    dn_number: int = 0
    dn_box_noise: float = 0.4  # dino: box corners move up to this x half the box size (negatives 1-2x)
    dn_label_noise: float = 0.5  # dino: a denoising query's label is redrawn with half this probability
    dn_labelbook: int = 0  # dino: rows of the denoising label embedding (+1); 0 = num_classes
    # rtdetr: the hybrid encoder's width and feed-forward width (0 = d_model, ffn_dim), and its CSPRep layers'
    # channel expansion and block-count multiplier (round(3 x depth_mult) RepVGG blocks each)
    encoder_dim: int = 0
    encoder_ffn_dim: int = 0
    expansion: float = 1.0
    depth_mult: float = 1.0
    # rtdetr: 2 = RT-DETRv2's decoder attention: `level_points` sampling points per level (empty: n_points on
    # each), offsets at `offset_scale` x the box size, `cross_attn_method` default (bilinear) | discrete
    rtdetr_version: int = 1
    level_points: list[int] = field(default_factory=list)
    offset_scale: float = 0.5
    cross_attn_method: str = "default"
    # dfine: D-FINE (models/dfine.py) on HGNetV2 `hgnet` (B0-B6; backbone_width scales its channels), its
    # learnable affine blocks (`use_lab`: the B0 / B1 sizes), and Fine-grained Distribution Refinement's
    # reg_max + 1 bins per edge under a weighting function of curvature `reg_scale`; it shares RT-DETR's
    # encoder_dim ... depth_mult and RT-DETRv2's level_points, offset_scale and cross_attn_method
    hgnet: str = "B0"
    use_lab: bool = False
    reg_max: int = 32
    reg_scale: float = 4.0
    frozen_bn: bool = False  # trainable BatchNorm uses and keeps its running statistics in training (students
    #                          initialised from a teacher, and data-parallel runs without SyncBatchNorm)

    def __post_init__(self):
        _check_choice("model.arch", self.arch, ("deformable", "dab", "dino", "hybrid", "rtdetr", "dfine"))
        _check_choice("model.backbone_depth", self.backbone_depth, (18, 34, 50, 101))
        _check_choice("model.backbone_norm", self.backbone_norm, ("frozen", "batch"))
        _check_choice("model.backbone_frozen_stages", self.backbone_frozen_stages, (0, 1))
        _check_choice("model.backbone_levels", self.backbone_levels, (3, 4))
        if self.backbone_levels == 4 and (self.arch != "dino" or self.num_levels < 4):
            raise ConfigError(
                "model.backbone_levels: 4 (C2-C5) is DINO's 5-scale input (arch dino, num_levels 5); "
                f"got arch {self.arch}, num_levels {self.num_levels}"
            )
        _check_range("model.backbone_width", self.backbone_width, low=0.0625)
        for name in ("d_model", "nheads", "dec_layers", "ffn_dim", "num_queries", "num_levels", "n_points"):
            _check_range(f"model.{name}", getattr(self, name), low=1)
        _check_range("model.enc_layers", self.enc_layers, low=0)
        _check_range("model.dn_number", self.dn_number, low=0)
        _check_range("model.dn_box_noise", self.dn_box_noise, low=0.0)
        _check_range("model.dn_label_noise", self.dn_label_noise, low=0.0, high=1.0)
        _check_range("model.dn_labelbook", self.dn_labelbook, low=0)
        if self.dn_number and self.arch not in ("dino", "rtdetr", "dfine"):
            raise ConfigError(
                f"model.dn_number: denoising queries are DINO's, RT-DETR's and D-FINE's (arch dino, rtdetr, dfine), "
                f"not {self.arch}'s; "
                "set 0"
            )
        self._check_rtdetr_fields()
        _check_range("model.num_classes", self.num_classes, low=0)
        _check_range("model.dropout", self.dropout, low=0.0, high=1.0)
        if self.d_model % self.nheads:
            raise ConfigError(f"model.d_model: {self.d_model} must be divisible by model.nheads={self.nheads}")
        if self.d_model % 2:
            raise ConfigError(f"model.d_model: expected an even number, got {self.d_model}")
        if (self.box_refine or self.two_stage) and self.arch != "deformable":
            raise ConfigError(f"model.box_refine/two_stage: variants of arch deformable, not {self.arch}")
        if self.two_stage and not self.box_refine:
            raise ConfigError("model.two_stage: needs model.box_refine=true (as the reference's two-stage variant)")
        if self.arch == "dino" and self.num_levels < 3:
            raise ConfigError(
                "model.num_levels: DINO selects its queries from multi-scale proposals; "
                f"expected 3 or more, got {self.num_levels}"
            )
        if self.arch in ("deformable", "dino"):
            if self.d_model % 32:
                raise ConfigError(f"model.d_model: {self.arch} needs a multiple of 32 (GroupNorm), got {self.d_model}")
            if self.num_levels == 2:
                raise ConfigError("model.num_levels: Deformable DETR takes 1 level (C5) or 3 and more (C3-C5, strided)")

    def _check_rtdetr_fields(self) -> None:
        _check_choice("model.rtdetr_version", self.rtdetr_version, (1, 2))
        _check_choice("model.cross_attn_method", self.cross_attn_method, ("default", "discrete"))
        if self.level_points and (
            len(self.level_points) != self.num_levels or any(int(p) < 1 for p in self.level_points)
        ):
            raise ConfigError(
                f"model.level_points: expected {self.num_levels} point counts >= 1 (one per level), "
                f"got {list(self.level_points)}"
            )
        if self.arch == "dfine":
            self._check_dfine_fields()
        elif self.rtdetr_version == 1 and (self.level_points or self.cross_attn_method != "default"):
            raise ConfigError(
                "model.level_points / cross_attn_method: RT-DETRv2's options (set model.rtdetr_version=2)"
            )
        _check_range("model.offset_scale", self.offset_scale, low=0.0)
        for name in ("encoder_dim", "encoder_ffn_dim"):
            _check_range(f"model.{name}", getattr(self, name), low=0)
        _check_range("model.expansion", self.expansion, low=0.0625)
        _check_range("model.depth_mult", self.depth_mult, low=0.0)

    def _check_dfine_fields(self) -> None:
        from clockdistill.models.hgnetv2 import VARIANTS

        _check_choice("model.hgnet", self.hgnet, tuple(VARIANTS))
        _check_choice("model.num_levels", self.num_levels, (2, 3))  # HGNetV2 stages 2-3 (the N size) or 1-3
        if self.reg_max < 4 or self.reg_max % 2:
            raise ConfigError(f"model.reg_max: expected an even number of bins >= 4, got {self.reg_max}")
        _check_range("model.reg_scale", self.reg_scale, low=1e-6)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the detection terms (the criterion returns them unweighted) and matcher costs."""

    cls: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # classification loss: focal (Deformable DETR, DAB-DETR, DINO) | vfl: varifocal, the target of a matched
    # query its box's IoU with the GT (RT-DETR; vfl_alpha weighs the negatives, focal_gamma their focus)
    cls_loss: str = "focal"
    vfl_alpha: float = 0.75
    # D-FINE (arch dfine): fine-grained localisation and decoupled distillation focal terms (losses/fdr.py)
    fgl: float = 0.15
    ddf: float = 1.5
    match_cost_class: float = 2.0
    match_cost_bbox: float = 5.0
    match_cost_giou: float = 2.0
    aux_loss: bool = True  # supervise every decoder layer, not only the last

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type is float:
                _check_range(f"loss.{f.name}", getattr(self, f.name), low=0.0)
        _check_choice("loss.cls_loss", self.cls_loss, ("focal", "vfl"))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 8
    lr: float = 2e-4
    lr_backbone: float = 2e-4
    # lr multiplier of deformable attention's sampling offsets and Deformable DETR's reference-point layer
    # (the reference implementation trains them at 0.1x; 1.0 keeps them at train.lr)
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 = no clipping
    warmup_iters: int = 100
    schedule: str = "cosine"  # cosine | step
    lr_drop_epochs: list[int] = field(default_factory=list)  # step schedule: x0.1 at these epochs
    min_lr_ratio: float = 0.05  # cosine: final lr as a fraction of lr
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    channels_last: bool = False  # NHWC convolutions (faster backbones on recent GPUs with amp)
    # torch.compile of the trained model's encoder and decoder: off | default | reduce-overhead | max-autotune
    compile: str = "off"
    output_dir: str = "runs/train"
    init_from: str = ""  # checkpoint whose weights start the model (fine-tuning; class heads follow the classes)
    class_map: str = ""  # with init_from: YAML/JSON file mapping new class names to the checkpoint's (Car: car)
    eval_every: int = 1  # evaluate on the val split every N epochs (and always after the last)
    resume: bool = True  # continue from output_dir/last when it exists
    progress: bool = True  # tqdm progress bars

    def __post_init__(self):
        _check_choice("train.schedule", self.schedule, ("cosine", "step"))
        _check_choice("train.compile", self.compile, ("off", "default", "reduce-overhead", "max-autotune"))
        _check_range("train.epochs", self.epochs, low=1)
        _check_range("train.batch_size", self.batch_size, low=1)
        _check_range("train.eval_every", self.eval_every, low=1)
        for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "min_lr_ratio"):
            _check_range(f"train.{name}", getattr(self, name), low=0.0)
        _check_range("train.warmup_iters", self.warmup_iters, low=0)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # used by `clockdistill distill`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"train.lr": 2e-4}; lists stay lists (MLflow params)."""
        return flatten_dict(self.to_dict())

    def updated(self, changes: dict[str, Any]) -> "Config":
        """A new config with dotted keys set, e.g. `cfg.updated({"train.epochs": 2})`, validated as
        any config is. Configs are values: this one is left as it is. (Setting `model.preset` here
        does not re-apply the preset: every model field is already explicit.)"""
        data = self.to_dict()
        for key, value in changes.items():
            data = set_dotted(data, key, value)
        return build_dataclass(Config, data)
