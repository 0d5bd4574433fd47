"""The `distill` section of a config: which method distils the student, and the knobs of its
memory term, its logit term and DETRDistill's parts (paper defaults)."""

import re
from dataclasses import dataclass, field

from clockdistill.config.dotted import check_choice as _check_choice
from clockdistill.config.dotted import check_range as _check_range
from clockdistill.config.methods import METHODS
from clockdistill.errors import ConfigError

_LAYERS_RE = re.compile(r"all|last|last\d+|\d+(,\d+)*")


@dataclass(frozen=True)
class MemoryDistillConfig:
    """Location-and-context-aware memory distillation (LCMD), and the FitNet baseline's weight.

    kd_mem = lambda * (1/B) * sum_images sum_levels [alpha * sum_i M_i S_i ||t_i - s_i||^2
                                                   + beta * sum_i (1 - M_i) S_i ||t_i - s_i||^2]
    """

    weight: float = 1.0  # lambda_mem: scales both the foreground and the background term
    alpha: float = 5e-5  # foreground weight (paper default, tuned for full-size COCO memory)
    beta: float = 1e-7  # background weight
    mask: str = "box"  # box: binary GT boxes | gaussian: boxes grown by gaussian_grow with a Gaussian fall-off
    gaussian_grow: float = 2.0  # gaussian mask: side length of the grown box as a multiple of the box's
    scale_norm: bool = True  # S mask: 1/box area inside boxes, 1/background count outside (False: S = 1)
    channel_reduce: str = (
        "sum"  # squared error summed (FGD convention, what alpha is tuned for) or averaged over channels
    )
    # none: the paper's raw squared error (alpha follows the memory's scale and width). channel: each
    # channel's error over the teacher memory's variance of that channel, averaged over channels.
    # teacher: the error summed over channels over the teacher's mean ||t||^2 per token. Both are
    # unchanged when the memory is rescaled or widened; statistics from the batch's unpadded tokens.
    normalize: str = "none"
    levels: list[int] = field(default_factory=list)  # memory levels to distil ([] = all; 0 = finest)
    with_pos: bool = False  # distil memory + positional encoding instead of the raw memory
    fitnet_weight: float = 1.0  # FitNet baseline: weight of the plain MSE over every unpadded token

    def __post_init__(self):
        for name in ("weight", "alpha", "beta", "fitnet_weight"):
            _check_range(f"distill.memory.{name}", getattr(self, name), low=0.0)
        _check_range("distill.memory.gaussian_grow", self.gaussian_grow, low=1.0)
        _check_choice("distill.memory.mask", self.mask, ("box", "gaussian"))
        _check_choice("distill.memory.channel_reduce", self.channel_reduce, ("sum", "mean"))
        _check_choice("distill.memory.normalize", self.normalize, ("none", "channel", "teacher"))
        for i, level in enumerate(self.levels):
            _check_range(f"distill.memory.levels[{i}]", level, low=0)


@dataclass(frozen=True)
class LogitDistillConfig:
    """Target-aware consistent logit distillation (TCLD); the vanilla-KD baseline uses the same loss
    knobs on Hungarian-matched teacher/student predictions instead of the target-aware queries."""

    weight: float = 1.0  # lambda_tcld: scales the class, L1 and GIoU terms
    temperature: float = 10.0
    cls_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    cls_form: str = "softmax_kl"  # softmax_kl: KL over classes x T^2 | binary_kl: per-class sigmoid KL x T^2
    cls_norm: str = "sum"  # sum over queries (as the author's code) | weight: / sum of weights | queries: / query count
    confidence: str = "max"  # teacher-confidence weight: max_c sigmoid | squared | none (all 1)
    confidence_threshold: float = 0.0  # weights below this become 0
    layers: str = "all"  # decoder layers distilled: all | last | lastN | comma list of indices (0 = first)
    groups: int = 3  # copies of the GT queries (each its own self-attention group)
    label_noise: float = 0.0  # probability of replacing a query's label with a random class
    box_noise: float = 0.0  # DN-style box jitter scale (0.4 = centre moves up to 20% of the size)
    random_queries: int = 0  # extra fixed random queries (background/context positions)
    embedding_seed: int = 0  # seed of the frozen random label table, box MLP and random queries

    def __post_init__(self):
        for name in ("weight", "cls_weight", "l1_weight", "giou_weight", "box_noise"):
            _check_range(f"distill.logit.{name}", getattr(self, name), low=0.0)
        if not self.temperature > 0:
            raise ConfigError(f"distill.logit.temperature: expected a value > 0, got {self.temperature!r}")
        _check_range("distill.logit.label_noise", self.label_noise, low=0.0, high=1.0)
        _check_range("distill.logit.confidence_threshold", self.confidence_threshold, low=0.0, high=1.0)
        _check_range("distill.logit.groups", self.groups, low=1)
        _check_range("distill.logit.random_queries", self.random_queries, low=0)
        _check_choice("distill.logit.cls_form", self.cls_form, ("softmax_kl", "binary_kl"))
        _check_choice("distill.logit.cls_norm", self.cls_norm, ("sum", "weight", "queries"))
        _check_choice("distill.logit.confidence", self.confidence, ("max", "squared", "none"))
        if not isinstance(self.layers, str) or not _LAYERS_RE.fullmatch(self.layers):
            raise ConfigError(
                f"distill.logit.layers: expected all, last, lastN or a comma list of layer indices, got {self.layers!r}"
            )


@dataclass(frozen=True)
class DetrDistillConfig:
    """DETRDistill (Chang et al., ICCV 2023), method `detrdistill`: three parts, each switchable.

    logits        the teacher's and student's own predictions, Hungarian-matched, distilled with the
                  distill.logit knobs (vanilla_kd is this part alone)
    feature       target-aware feature imitation: per teacher decoder layer, its top_k predictions
                  (class score x best IoU with a GT box) weigh their query embeddings' cosine
                  similarity to the encoder's input tokens; that map (clamped at 0.01, over its max per
                  level) masks the squared error between teacher and student tokens
    query_prior   the student decodes the teacher's queries, supervised with the teacher's own
                  Hungarian assignment of those queries to the GT (per decoder layer)
    """

    logits: bool = True
    feature: bool = True
    feature_weight: float = 1.0  # the paper's code: each layer's masked MSE, unweighted
    top_k: int = 100  # teacher predictions per image that weigh the feature mask (the detector's max_per_img)
    query_prior: bool = True
    query_prior_weight: float = 1.0  # times the detection weights (loss.cls/bbox/giou)

    def __post_init__(self):
        for name in ("feature_weight", "query_prior_weight"):
            _check_range(f"distill.detrdistill.{name}", getattr(self, name), low=0.0)
        _check_range("distill.detrdistill.top_k", self.top_k, low=1)


@dataclass(frozen=True)
class DistillConfig:
    """Which method distils the student, from which teacher, with which knobs (paper defaults)."""

    # clockdistill | none | vanilla_kd | fitnet | memory_only | logit_only | detrdistill
    method: str = "clockdistill"
    teacher: str = ""  # teacher checkpoint directory (from `clockdistill train`)
    init_student: bool = False  # copy the teacher's weights into the student wherever names and shapes match
    # Teacher-output cache: the teacher's memory and its predictions on the target-aware (and its own)
    # queries, computed once per image and view and read by every trial. off | auto (when the run
    # allows it, else the live teacher, saying why) | on (an error when it cannot be used)
    teacher_cache: str = "off"
    teacher_cache_max_gb: float = 20.0  # larger caches fall back to the live teacher
    # full: every memory token of every view | sampled: the tokens of the GT boxes grown by
    # teacher_cache_region_grow in full and teacher_cache_background others per image and view, reweighted
    # so that the background term's expectation is exact (distill/compact.py)
    teacher_cache_memory: str = "full"
    teacher_cache_background: int = 512
    # the stored region's growth: 0 = the run's own mask's (1 for box masks, gaussian_grow for Gaussian
    # ones); a sweep that searches gaussian_grow sets it to the largest, so that every trial reads one cache
    teacher_cache_region_grow: float = 0.0
    teacher_cache_dtype: str = "fp16"  # fp16 | int8 (per-channel scales per image and view)
    # invariant: the teacher gives each image of a padded batch its outputs alone (models/invariance.py;
    # what a cache keyed by image needs) | reference: the original code's numbers, which depend on the
    # batch's padding. The same on unpadded batches.
    teacher_padding: str = "invariant"
    # off | node: in a sweep, the trials on one node that train on the same batch at the same time run
    # the teacher once between them (distill/exchange.py; for data sets no cache holds: COCO)
    teacher_share: str = "off"
    memory: MemoryDistillConfig = field(default_factory=MemoryDistillConfig)
    logit: LogitDistillConfig = field(default_factory=LogitDistillConfig)
    detrdistill: DetrDistillConfig = field(default_factory=DetrDistillConfig)

    def __post_init__(self):
        _check_choice("distill.method", self.method, tuple(METHODS))
        d = self.detrdistill
        if self.method == "detrdistill" and not (d.logits or d.feature or d.query_prior):
            raise ConfigError(
                "distill.detrdistill: every part is switched off (logits, feature, query_prior); "
                "keep one, or use distill.method=none"
            )
        _check_choice("distill.teacher_cache", self.teacher_cache, ("off", "auto", "on"))
        _check_range("distill.teacher_cache_max_gb", self.teacher_cache_max_gb, low=0.0)
        _check_choice("distill.teacher_padding", self.teacher_padding, ("invariant", "reference"))
        _check_choice("distill.teacher_share", self.teacher_share, ("off", "node"))
        _check_choice("distill.teacher_cache_memory", self.teacher_cache_memory, ("full", "sampled"))
        _check_range("distill.teacher_cache_background", self.teacher_cache_background, low=1)
        if self.teacher_cache_region_grow != 0:
            _check_range("distill.teacher_cache_region_grow", self.teacher_cache_region_grow, low=1.0)
        _check_choice("distill.teacher_cache_dtype", self.teacher_cache_dtype, ("fp16", "int8"))
        if self.teacher_cache_dtype == "int8" and self.teacher_cache_memory != "sampled":
            raise ConfigError("distill.teacher_cache_dtype: int8 needs distill.teacher_cache_memory=sampled")

    @property
    def cache_region_grow(self) -> float:
        """The growth of the boxes whose tokens a sampled cache stores in full (teacher_cache_region_grow)."""
        if self.teacher_cache_region_grow:
            return self.teacher_cache_region_grow
        return self.memory.gaussian_grow if self.memory.mask == "gaussian" else 1.0

    @property
    def uses_memory(self) -> bool:
        """A memory term of either kind (CLoCKDistill's masked one or FitNet's plain MSE)."""
        return METHODS[self.method].memory is not None

    @property
    def uses_target_queries(self) -> bool:
        return METHODS[self.method].target_queries
