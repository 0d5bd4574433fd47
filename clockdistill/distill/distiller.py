"""The Distiller: a frozen teacher, a student and a DistillConfig, as a TrainingTask for `fit`.

Every method shares this one interface; `losses()` returns the student's detection terms and the
method's distillation terms, all unweighted, and the weights that combine them:

    none          L_det
    vanilla_kd    L_det + lambda_tcld * sum_e (cls * kd_cls_e + l1 * kd_l1_e + giou * kd_giou_e)
                  on Hungarian-matched teacher/student predictions of the detectors' own queries
    fitnet        L_det + w * kd_fitnet (plain memory MSE over every unpadded token)
    memory_only   L_det + lambda_mem * (alpha * kd_mem_fg + beta * kd_mem_bg)
    logit_only    L_det + lambda_tcld * sum_e (...) on target-aware queries
    clockdistill  both of the last two
    detrdistill   vanilla_kd's terms + w_feat * kd_feat (target-aware feature imitation of the encoder
                  input tokens) + w_qp * sum_e (cls * kd_qp_cls_e + bbox * kd_qp_bbox_e + giou * kd_qp_giou_e)
                  (the student decoding the teacher's queries, under the teacher's assignment)
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from clockdistill.config.methods import METHODS
from clockdistill.config.sections import Config
from clockdistill.distill.exchange import SharedOutputs, digest
from clockdistill.distill.losses import feature_term, fitnet_term, logit_terms, memory_terms
from clockdistill.distill.masks import level_token_mask, memory_masks
from clockdistill.distill.pairing import check_memory_geometry, check_query_prior, memory_pairing
from clockdistill.distill.queries import TargetQueryBuilder
from clockdistill.distill.shared_steps import SharedTeacherSteps
from clockdistill.distill.student_pass import StudentPass, target_queries
from clockdistill.distill.teacher import FrozenTeacher
from clockdistill.distributed import global_mean, is_distributed, may_leave_parameters_unused, wrap_ddp
from clockdistill.errors import ConfigError, TrainingDiverged
from clockdistill.losses.criterion import SetCriterion, model_detection_weights
from clockdistill.metrics import LOSS_PARTS, TEACHER_AP, TEACHER_SHARED, loss_part
from clockdistill.models.common import Memory, Queries, decoder_layers
from clockdistill.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from clockdistill.ops.host import small_tensor

log = logging.getLogger(__name__)

LOGIT_PARTS = ("cls", "l1", "giou")


def layer_pairs(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs to distil. Layers are aligned from the last one, so a
    shallower student's last layer learns from the teacher's last layer."""
    if spec == "all":
        chosen = list(range(student_layers))
    elif spec.startswith("last"):
        n = int(spec[4:] or 1)
        chosen = list(range(max(0, student_layers - n), student_layers))
    else:
        chosen = sorted({int(x) for x in spec.split(",")})
        bad = [i for i in chosen if i >= student_layers]
        if bad:
            raise ConfigError(
                f"distill.logit.layers: layer {bad[0]} does not exist (the student has {student_layers} decoder "
                f"layers, 0..{student_layers - 1})"
            )
    offset = teacher_layers - student_layers
    return [(e, e + offset) for e in chosen if e + offset >= 0]


class Distiller(SharedTeacherSteps):
    """Trains `student` (the `model` that `fit` evaluates and checkpoints) against a frozen teacher."""

    def __init__(self, teacher: FrozenTeacher, student: nn.Module, cfg: Config):
        self.teacher, self.model, self.cfg = teacher, student, cfg
        dc = self.dcfg = cfg.distill
        if teacher.num_classes != student.num_classes:
            raise ConfigError(
                f"model.num_classes: the student has {student.num_classes} classes, the teacher {teacher.num_classes}"
            )
        self.method = dc.method
        caps = self.caps = METHODS[dc.method]
        dd = dc.detrdistill
        self.uses_memory = caps.memory is not None
        self.uses_queries = caps.target_queries
        self.uses_matching = caps.matched_logits and (dd.logits or not caps.detrdistill)
        self.uses_feature = caps.detrdistill and dd.feature
        self.uses_prior = caps.detrdistill and dd.query_prior
        if self.uses_feature:  # DETRDistill's feature imitation compares the encoders' inputs token for token
            check_memory_geometry(teacher.cfg, student.cfg)
        # token for token (one architecture), or the levels of equal stride (across architectures)
        self.pairing = memory_pairing(teacher.cfg, student.cfg) if self.uses_memory else None
        self._shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}  # the teacher's levels per input size
        dt, ds = teacher.cfg.d_model, student.cfg.d_model
        if self.uses_prior:
            check_query_prior(teacher.cfg, student.cfg)
        self.adapter = nn.Linear(ds, dt) if (self.uses_memory or self.uses_feature) and ds != dt else None
        self.pairs = layer_pairs(dc.logit.layers, student.cfg.dec_layers, teacher.cfg.dec_layers)
        if not self.pairs and (caps.logit_terms or self.uses_prior):
            raise ConfigError(
                f"distill.logit.layers: {dc.logit.layers!r} selects no student layer that has a teacher counterpart"
            )
        self.queries = TargetQueryBuilder(student.num_classes, [dt, ds], dc.logit) if self.uses_queries else None
        self.criterion = SetCriterion.from_config(cfg.loss, student.num_classes)
        self.weights = model_detection_weights(cfg.loss, student.cfg)
        self.kd_weights = self._kd_weights()
        self.weights.update(self.kd_weights)
        self.cache = (
            None  # a TeacherCache (teacher outputs read, not computed) or a PendingTeacherCache (see distill/cache.py)
        )
        # teacher outputs shared with the runs training on the same batch (distill/exchange.py)
        self.shared: SharedOutputs | None = None
        self._teacher_id = f"{dc.teacher}|{dc.teacher_padding}|amp={cfg.train.amp}"
        tokens = ("memory+pos" if dc.memory.with_pos else "memory") if self.uses_memory else None
        tokens = "features" if self.uses_feature else tokens
        self.student_pass: nn.Module = StudentPass(
            student, self.queries, self.adapter, tokens
        )  # DDP-wrapped in data-parallel runs

    @property
    def fuse_decoder(self) -> bool:
        return self._pass().fuse

    @fuse_decoder.setter
    def fuse_decoder(self, value: bool) -> None:
        self._pass().fuse = value

    def _pass(self) -> StudentPass:
        return getattr(self.student_pass, "module", self.student_pass)

    def distribute(self, device: torch.device) -> None:
        """Data-parallel training: gradients of the student (and adapter) averaged over ranks."""
        unused = may_leave_parameters_unused(self._pass().student, self.criterion.aux_loss)
        self.student_pass = wrap_ddp(self._pass(), device, find_unused_parameters=unused)

    # -- TrainingTask ----------------------------------------------------------------------------

    @property
    def extra_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter} if self.adapter is not None else {}

    def parameters_to_train(self) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.adapter is not None:
            named += [(f"adapter.{n}", p) for n, p in self.adapter.named_parameters()]
        return named

    def to(self, device: torch.device | str) -> "Distiller":
        for module in (self.teacher, self.model, self.adapter, self.queries):
            if module is not None:
                module.to(device)
        return self

    def losses(self, images: Tensor, mask: Tensor, targets: list[dict]) -> tuple[dict[str, Tensor], dict[str, float]]:
        # min 1 slot under DDP: a rank with no object in its share must run the same collectives as the others
        qs = self.queries.sample(targets, images.device, min_slots=int(is_distributed())) if self.uses_queries else None
        cache = self._cache_now() if self.caps.uses_teacher else None
        mem_t, tq = self._begin_shared_step(images, mask, targets, qs, cache)
        prior = None
        if self.uses_prior:  # the teacher's own queries, for the student to decode (DETRDistill)
            if mem_t is None:
                mem_t = self._shared_memory(images, mask)
            with torch.no_grad():
                prior = self.teacher.detector.default_queries(mem_t)
        mem_s, tokens_s, out_s, target_s, prior_s = self.student_pass(images, mask, qs, targets=targets, prior=prior)
        terms = dict(self.criterion(out_s, targets))
        if not self.caps.uses_teacher:
            return terms, self.weights
        if mem_t is None and cache is None:
            mem_t = self._shared_memory(images, mask)
        if self.uses_memory:
            terms.update(
                self._memory_terms(
                    *self._teacher_memory(mem_t, mem_s, targets, tuple(images.shape[-2:])),
                    tokens_s,
                    mem_s,
                    targets,
                    tuple(images.shape[-2:]),
                    mem_t,
                    mask,
                )
            )
        if self.uses_queries:
            terms.update(self._target_query_terms(mem_t, qs, target_s, targets, out_s, tq))
        if self.uses_matching or self.uses_feature or self.uses_prior:
            terms.update(self._teacher_prediction_terms(mem_t, prior, targets, images, tokens_s, mem_s, out_s, prior_s))
        return terms, self.weights

    def _teacher_prediction_terms(self, mem_t, prior, targets, images, tokens_s, mem_s, out_s, prior_s):
        """The terms that read the teacher's own predictions, layer by layer: matched logits
        (vanilla KD, DETRDistill), DETRDistill's feature imitation and query-prior assignment."""
        if mem_t is None:
            layers_t = self.cache.default_layers(targets, images.device)
        elif prior is not None:
            layers_t = decoder_layers(self._shared("prior", lambda: self.teacher.decode(mem_t, **_decode_args(prior))))
        else:
            layers_t = decoder_layers(self._shared("default", lambda: self.teacher.predict_default(mem_t)))
        terms: dict[str, Tensor] = {}
        if self.uses_matching:
            terms.update(self._matched_terms(layers_t, out_s))
        if self.uses_feature:
            terms["kd_feat"] = feature_term(
                layers_t,
                mem_t.features,
                tokens_s,
                mem_s.padding_mask,
                mem_s.spatial_shapes,
                targets,
                self.dcfg.detrdistill.top_k,
            )
        if self.uses_prior:
            terms.update(self._prior_terms(layers_t, prior_s, targets))
        return terms

    # -- the terms -------------------------------------------------------------------------------

    def _teacher_memory(
        self, mem_t: Memory | None, mem_s: Memory, targets: list[dict], image_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor | None]:
        """The teacher tokens the memory terms compare with: memory (+ pos), live or cached, and a
        sampled cache's token weights (None: every token counts once)."""
        if mem_t is None:
            # one architecture: the student's levels; two: the teacher's own at this canvas
            device = mem_s.memory.device
            shapes = mem_s.spatial_shapes if self.pairing is None else self._teacher_shapes(image_hw, device)
            t, weight = self.cache.read_memory(targets, device, shapes)
            want = sum(h * w for h, w in shapes)
            if t.shape[1] != want:
                raise ConfigError(
                    f"distill.teacher_cache: the cached teacher memory has {t.shape[1]} tokens per image, "
                    f"{want} expected (a different canvas or levels; delete {self.cache.path})"
                )
            return t, weight
        if self.pairing is None and mem_t.spatial_shapes != mem_s.spatial_shapes:
            raise ConfigError(
                f"model: the student's memory levels {mem_s.spatial_shapes} do not line up with the teacher's "
                f"{mem_t.spatial_shapes} (use the same num_levels and dilation)"
            )
        return (mem_t.memory + mem_t.pos if self.dcfg.memory.with_pos else mem_t.memory), None

    def _memory_terms(
        self,
        t: Tensor,
        weight: Tensor | None,
        s: Tensor,
        mem_s: Memory,
        targets: list[dict],
        image_hw: tuple[int, int],
        mem_t: Memory | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Teacher tokens `t` against the student's `s` (memory, + pos, adapted). One architecture: the
        two share their geometry (same levels and canvas), so the student's padding mask and level
        shapes serve both. Across architectures: the levels of equal stride, on their common grid
        (self.pairing; distill.memory.levels then counts the shared levels). `weight` (B, N): a sampled
        cache's token weights (distill/compact.py), carried through the pairing as one more channel."""
        mc = self.dcfg.memory
        shapes, padding, extents = mem_s.spatial_shapes, mem_s.padding_mask, None
        if self.pairing is not None:  # (cached: the teacher's level grids at this canvas, from one probe)
            shapes_t = mem_t.spatial_shapes if mem_t is not None else self._teacher_shapes(image_hw, t.device)
            if weight is not None:
                t = torch.cat([t, weight[..., None]], -1)
            t, s, shapes, padding, extents = self.pairing.select(t, shapes_t, s, shapes, mask)
            if weight is not None:
                t, weight = t[..., :-1], t[..., -1]
        levels = level_token_mask(shapes, mc.levels, t.device)
        if self.caps.memory == "plain":
            return {"kd_fitnet": fitnet_term(t, s, padding, levels, weight)}
        m, sc = memory_masks(targets, image_hw, shapes, padding, mc.mask, mc.gaussian_grow, mc.scale_norm, extents)
        return memory_terms(t, s, m, sc, levels, mc.channel_reduce, mc.normalize, weight)

    def _cache_now(self):
        """The teacher cache, or None (none, or another process still builds it)."""
        cache = self.cache.get() if self.cache is not None else None
        if cache is not None and cache is not self.cache:
            self.cache = cache
        return cache

    def _teacher_shapes(self, image_hw: tuple[int, int], device) -> list[tuple[int, int]]:
        """The teacher's memory levels for an (unpadded) input of `image_hw`, read once per size from an
        encoding of a blank image (a cached run's teacher is otherwise never run)."""
        if image_hw not in self._shapes:
            with torch.no_grad():
                probe = self.teacher.encode(
                    torch.zeros(1, 3, *image_hw, device=device),
                    torch.zeros(1, *image_hw, dtype=torch.bool, device=device),
                )
            self._shapes[image_hw] = list(probe.spatial_shapes)
        return self._shapes[image_hw]

    def _target_query_terms(
        self, mem_t: Memory | None, qs, layers_s: list[dict] | None, targets: list[dict], out_s: dict, tq=None
    ) -> dict[str, Tensor]:
        if qs.size == 0:  # no GT in the batch and no random queries: zero terms that still touch the graph
            zero = out_s["pred_logits"].sum() * 0
            return {f"kd_{part}_{e}": zero for e, _ in self.pairs for part in LOGIT_PARTS}
        if mem_t is None:
            n_gt = max((len(t["labels"]) for t in targets), default=0)
            layers_t = self.cache.query_layers(targets, n_gt, qs.labels.device, qs.size)
        else:
            if tq is None:  # (tq: the inputs and their digest, made as a shared step began)
                inputs = target_queries(self.teacher.detector, self.queries, qs)
                tq = (inputs, digest(*inputs.values()) if self.shared is not None else "")
            inputs, detail = tq
            layers_t = decoder_layers(self._shared("queries", lambda: self.teacher.decode(mem_t, **inputs), detail))
        return self._pair_terms([(e_s, layers_t[e_t], layers_s[e_s]) for e_s, e_t in self.pairs], qs.valid)

    def _matched_terms(self, layers_t: list[dict], out_s: dict) -> dict[str, Tensor]:
        """Vanilla KD: each distilled student layer's queries matched one-to-one (Hungarian) to the
        teacher's predictions of the corresponding layer, then the same weighted KD terms."""
        layers_s = decoder_layers(out_s)
        matched = _match([(layers_t[e_t], layers_s[e_s]) for e_s, e_t in self.pairs])
        pairs = []
        for (e_s, e_t), (si, ti) in zip(self.pairs, matched):
            t, s = layers_t[e_t], layers_s[e_s]
            keys = ("pred_logits", "pred_boxes")
            pairs.append(
                (
                    e_s,
                    {k: torch.stack([t[k][b, i] for b, i in enumerate(ti)]) for k in keys},
                    {k: torch.stack([s[k][b, i] for b, i in enumerate(si)]) for k in keys},
                )
            )
        valid = torch.ones(len(si), len(si[0]), dtype=torch.bool, device=out_s["pred_logits"].device)
        return self._pair_terms(pairs, valid)

    def _prior_terms(self, layers_t: list[dict], prior_s: list[dict], targets: list[dict]) -> dict[str, Tensor]:
        """DETRDistill's query-prior assignment: each distilled student layer's outputs for the
        teacher's queries, against the GT under the teacher's Hungarian assignment of its own
        predictions of the corresponding layer (the detection terms, with those fixed pairs)."""
        num_boxes = max(global_mean(float(sum(len(t["labels"]) for t in targets))), 1.0)
        terms = {}
        matched = self.criterion.matcher.match_many([(layers_t[e_t], targets) for _, e_t in self.pairs])
        for (e_s, _), indices in zip(self.pairs, matched):
            lt = self.criterion.layer_losses(prior_s[e_s], targets, num_boxes, indices)
            terms.update({f"kd_qp_{k[len('loss_') :]}_{e_s}": v for k, v in lt.items()})
        return terms

    def _pair_terms(self, pairs: list[tuple[int, dict, dict]], valid: Tensor) -> dict[str, Tensor]:
        """kd_cls_e, kd_l1_e, kd_giou_e for (student layer e, teacher predictions, student predictions)."""
        terms = {}
        for e_s, t, s in pairs:
            cls, l1, giou = logit_terms(t, s, valid, self.dcfg.logit)
            terms.update({f"kd_cls_{e_s}": cls, f"kd_l1_{e_s}": l1, f"kd_giou_{e_s}": giou})
        return terms

    # -- weights and the printed formula -----------------------------------------------------------

    def _kd_weights(self) -> dict[str, float]:
        dc, w = self.dcfg, {}
        if self.caps.memory == "masked":
            w["kd_mem_fg"] = dc.memory.weight * dc.memory.alpha
            w["kd_mem_bg"] = dc.memory.weight * dc.memory.beta
        if self.caps.memory == "plain":
            w["kd_fitnet"] = dc.memory.fitnet_weight
        if self.uses_feature:
            w["kd_feat"] = dc.detrdistill.feature_weight
        if self.uses_prior:
            lw, qw = self.cfg.loss, dc.detrdistill.query_prior_weight
            for e, _ in self.pairs:
                w.update(
                    {f"kd_qp_cls_{e}": qw * lw.cls, f"kd_qp_bbox_{e}": qw * lw.bbox, f"kd_qp_giou_{e}": qw * lw.giou}
                )
        if self.uses_queries or self.uses_matching:
            lc = dc.logit
            for e, _ in self.pairs:
                w.update(
                    {
                        f"kd_cls_{e}": lc.weight * lc.cls_weight,
                        f"kd_l1_{e}": lc.weight * lc.l1_weight,
                        f"kd_giou_{e}": lc.weight * lc.giou_weight,
                    }
                )
        return w

    def formula(self) -> str:
        """The loss this distiller minimises, with its weights, as text."""
        dc, lc, mc = self.dcfg, self.dcfg.logit, self.dcfg.memory
        lw = self.cfg.loss
        n_layers = self.model.cfg.dec_layers if lw.aux_loss else 1
        parts = [f"L_det[{lw.cls:g}*focal + {lw.bbox:g}*L1 + {lw.giou:g}*GIoU, {n_layers} decoder layer(s)]"]
        notes = []
        kw = self.kd_weights
        if "kd_mem_fg" in kw:
            parts.append(f"{kw['kd_mem_fg']:g}*kd_mem_fg + {kw['kd_mem_bg']:g}*kd_mem_bg")
            levels = ",".join(map(str, mc.levels)) or "all"
            error = {
                "none": f"{'summed' if mc.channel_reduce == 'sum' else 'averaged'} over {self.teacher.cfg.d_model} "
                "channels",
                "channel": "over the teacher memory's per-channel variance, averaged over channels",
                "teacher": "summed over channels, over the teacher memory's mean ||t||^2",
            }[mc.normalize]
            notes.append(
                f"kd_mem: GT {mc.mask} mask M, scale mask S {'on' if mc.scale_norm else 'off'}, squared error "
                f"{error}, levels {levels}"
                f"{', memory+pos' if mc.with_pos else ''}{', student adapter' if self.adapter is not None else ''}; "
                "/batch"
            )
        if "kd_fitnet" in kw:
            parts.append(f"{kw['kd_fitnet']:g}*kd_fitnet")
            notes.append("kd_fitnet: mean squared error over every unpadded memory token and channel")
        if "kd_feat" in kw:
            parts.append(f"{kw['kd_feat']:g}*kd_feat")
            notes.append(
                f"kd_feat: encoder input tokens' squared error under each teacher layer's mask (its top "
                f"{dc.detrdistill.top_k} predictions' score x best GT IoU weigh their query embeddings' cosine "
                f"similarity to the tokens), mean per level{', student adapter' if self.adapter is not None else ''}"
            )
        if self.uses_prior:
            e0 = self.pairs[0][0]
            layers = "{" + ",".join(str(e) for e, _ in self.pairs) + "}"
            parts.append(
                f"sum_e in {layers} ({kw[f'kd_qp_cls_{e0}']:g}*kd_qp_cls_e + {kw[f'kd_qp_bbox_{e0}']:g}*kd_qp_bbox_e + "
                f"{kw[f'kd_qp_giou_{e0}']:g}*kd_qp_giou_e)"
            )
            notes.append(
                "kd_qp: the teacher's queries decoded by the student, detection terms under the teacher's own "
                "Hungarian assignment of the corresponding layer"
            )
        if self.pairs and (self.uses_queries or self.uses_matching):
            e0 = self.pairs[0][0]
            layers = "{" + ",".join(str(e) for e, _ in self.pairs) + "}"
            parts.append(
                f"sum_e in {layers} ({kw[f'kd_cls_{e0}']:g}*kd_cls_e + {kw[f'kd_l1_{e0}']:g}*kd_l1_e + "
                f"{kw[f'kd_giou_{e0}']:g}*kd_giou_e)"
            )
            src = (
                (
                    f"target-aware queries ({lc.groups} group(s) of GT queries, {lc.random_queries} random, "
                    f"noise label {lc.label_noise:g} / box {lc.box_noise:g})"
                )
                if self.uses_queries
                else "Hungarian-matched predictions of the detectors' own queries"
            )
            notes.append(
                f"kd_cls/l1/giou: {src}; teacher-confidence weight {lc.confidence}; "
                f"{lc.cls_form} at T={lc.temperature:g} x T^2, cls normalised by {lc.cls_norm}; "
                f"student layer e <- teacher layer {self.pairs[0][1] - e0:+d}"
            )
        head = f"loss ({dc.method}) = " + " + ".join(parts)
        return "\n".join([head] + [f"  {n}" for n in notes])

    def extra_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Added to every epoch's metrics: the weighted contributions of the detection, memory and
        logit parts to the loss (loss_det, loss_kd_mem, loss_kd_logit) and the teacher's AP."""
        groups = dict.fromkeys(LOSS_PARTS, 0.0)
        for k, w in self.weights.items():
            if k in metrics:
                groups[loss_part(k)] += w * metrics[k]
        if self.teacher.best_ap is not None:
            groups[TEACHER_AP] = self.teacher.best_ap
        if self.shared is not None:  # the part of the epoch's teacher outputs another run computed
            groups[TEACHER_SHARED] = self.shared.share_taken()
        return groups


@torch.no_grad()
def _match(layers: list[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """For each (teacher, student) layer pair, per image, Hungarian matching of student queries to
    teacher predictions on class-probability L1 + 5 * box L1 - 2 * GIoU: student and teacher indices per
    image (min(Qs, Qt) each). Every pair's costs reach the host in one copy, checked there (a copy and
    a device-side check per image drained a GPU's queue twice per image and layer)."""
    costs = []
    for t, s in layers:
        pt, ps = t["pred_logits"].float().sigmoid(), s["pred_logits"].float().sigmoid()
        bt, bs = t["pred_boxes"].float(), s["pred_boxes"].float()
        giou = torch.stack(
            [generalized_box_iou(box_cxcywh_to_xyxy(bs[b]), box_cxcywh_to_xyxy(bt[b])) for b in range(pt.shape[0])]
        )
        costs.append(torch.cdist(ps, pt, p=1) / pt.shape[-1] + 5 * torch.cdist(bs, bt, p=1) - 2 * giou)
    host = torch.stack(costs).cpu()  # self.pairs is never empty (checked when the distiller is built)
    if not torch.isfinite(host).all():
        raise TrainingDiverged("the student's predictions are not finite (NaN or inf): the model has diverged")
    device = layers[0][1]["pred_boxes"].device
    out = []
    for layer in host.numpy():
        s_idx, t_idx = [], []
        for block in layer:
            si, ti = linear_sum_assignment(block)
            s_idx.append(small_tensor(si, device, torch.long))
            t_idx.append(small_tensor(ti, device, torch.long))
        out.append((s_idx, t_idx))
    return out


def _decode_args(q: Queries) -> dict[str, Tensor | None]:
    return {"content": q.content, "reference": q.reference, "position": q.position}
