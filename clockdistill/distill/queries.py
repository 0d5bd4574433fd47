"""Target-aware queries: decoder queries built from the ground truth, identical for teacher and student.

Per GT object (label c, box b in normalised cxcywh):
    content   = [E[c], 1]           a frozen random label-embedding row (width d-1) and an indicator 1
    position  = MLP(inverse_sigmoid(b))   a frozen random 4 -> 64 -> d MLP, added to the decoder's own
                                    positional query at every layer
    reference = b                   the decoder refines it layer by layer as for its own queries
The GT queries are repeated in `groups` copies, each padded to the batch's largest GT count, plus
optional fixed random queries (random content and box). Every group attends only to itself, padded
slots to nothing but themselves, so adding a group changes no other group's outputs.

The tables are built from `embedding_seed` and never trained ("unlearnable"): they hold no gradient
and are not in any optimizer, so a resumed run rebuilds exactly the same queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clockdistill.config.distill import LogitDistillConfig
from clockdistill.ops.boxes import inverse_sigmoid
from clockdistill.ops.host import small_tensor


@dataclass
class QuerySet:
    """Sampled query inputs, shared by every model: labels (B, K) (num_classes on padded and random
    slots), boxes (B, K, 4), valid (B, K) False on padded slots, group (K,) the group of each slot
    (the random queries form one more group), random (K,) True on the fixed random queries."""

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    group: Tensor
    random: Tensor

    @property
    def size(self) -> int:
        return self.labels.shape[1]

    def attention_mask(self) -> Tensor:
        """(B, K, K) bool, True where query i may not attend to key j: other groups, and padded keys
        other than itself."""
        K = self.size
        other_group = self.group[:, None] != self.group[None, :]
        padded_key = ~self.valid[:, None, :] & ~torch.eye(K, dtype=torch.bool, device=self.valid.device)
        return other_group[None] | padded_key


class TargetQueryEmbedding(nn.Module):
    """The frozen random tables of one model width."""

    def __init__(self, num_classes: int, d_model: int, num_random: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.label = nn.Parameter(torch.randn(num_classes + 1, d_model - 1, generator=g), requires_grad=False)
        self.box_w1 = nn.Parameter(torch.randn(64, 4, generator=g) / 2.0, requires_grad=False)
        self.box_b1 = nn.Parameter(torch.zeros(64), requires_grad=False)
        self.box_w2 = nn.Parameter(torch.randn(d_model, 64, generator=g) / 8.0, requires_grad=False)
        self.box_b2 = nn.Parameter(torch.zeros(d_model), requires_grad=False)
        self.random_content = nn.Parameter(torch.randn(num_random, d_model, generator=g), requires_grad=False)

    def box_position(self, boxes: Tensor) -> Tensor:
        x = inverse_sigmoid(boxes)
        return torch.relu(x @ self.box_w1.T + self.box_b1) @ self.box_w2.T + self.box_b2

    def forward(self, qs: QuerySet) -> dict[str, Tensor]:
        """Decoder inputs (see DETR.decode) for a query set."""
        content = self.label[qs.labels]
        content = torch.cat([content, torch.ones_like(content[..., :1])], -1)
        if len(self.random_content):  # its count is the config's, known here: no host read of qs.random
            content[:, qs.random] = self.random_content[None].expand(content.shape[0], -1, -1).to(content.dtype)
        return {
            "content": content,
            "reference": qs.boxes,
            "position": self.box_position(qs.boxes),
            "self_attn_mask": qs.attention_mask(),
        }


class TargetQueryBuilder(nn.Module):
    """Samples the query set of a batch (groups, padding, noise, random queries) and embeds it for
    each model width."""

    def __init__(self, num_classes: int, widths: list[int], cfg: LogitDistillConfig):
        super().__init__()
        self.num_classes, self.cfg = num_classes, cfg
        self.embeddings = nn.ModuleDict(
            {
                str(d): TargetQueryEmbedding(num_classes, d, cfg.random_queries, cfg.embedding_seed)
                for d in sorted(set(widths))
            }
        )
        g = torch.Generator().manual_seed(cfg.embedding_seed + 1)
        centres = torch.rand(cfg.random_queries, 2, generator=g)
        sizes = 0.05 + 0.25 * torch.rand(cfg.random_queries, 2, generator=g)
        self.register_buffer("random_boxes", torch.cat([centres, sizes], -1), persistent=False)
        self.requires_grad_(False)

    def sample(self, targets: list[dict], device: torch.device, min_slots: int = 0) -> QuerySet:
        """`min_slots`: at least this many slots (extra ones padded), e.g. 1 so that a data-parallel
        rank whose images have no object still runs the same collective steps as the others."""
        cfg, B = self.cfg, len(targets)
        n_gt = max((len(t["labels"]) for t in targets), default=0)
        G, R = cfg.groups, cfg.random_queries
        K = max(G * n_gt + R, min_slots)
        labels = torch.full((B, K), self.num_classes, dtype=torch.long, device=device)
        boxes = small_tensor([0.5, 0.5, 0.1, 0.1], device).repeat(B, K, 1)
        valid = torch.zeros(B, K, dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            for g in range(G):
                sl = slice(g * n_gt, g * n_gt + n)
                labels[b, sl] = t["labels"].to(device)
                boxes[b, sl] = t["boxes"].to(device).float()
                valid[b, sl] = True
        if n_gt and cfg.label_noise > 0:
            flip = (torch.rand(B, K, device=device) < cfg.label_noise) & valid
            labels = torch.where(flip, torch.randint(0, self.num_classes, (B, K), device=device), labels)
        if n_gt and cfg.box_noise > 0:
            wh = boxes[..., 2:].repeat(1, 1, 2) * small_tensor([0.5, 0.5, 1.0, 1.0], device)
            jitter = (torch.rand(B, K, 4, device=device) * 2 - 1) * wh * cfg.box_noise
            boxes = torch.where(valid[..., None], boxes + jitter, boxes)
        group = torch.arange(G, device=device).repeat_interleave(n_gt)
        if R:
            boxes[:, G * n_gt : G * n_gt + R] = self.random_boxes.to(device)
            valid[:, G * n_gt : G * n_gt + R] = True
            group = torch.cat([group, torch.full((R,), G, device=device)])
        if K > G * n_gt + R:  # filler slots: padding of a group of their own
            group = torch.cat([group, torch.full((K - G * n_gt - R,), G + 1, device=device)])
        random = torch.zeros(K, dtype=torch.bool, device=device)
        random[G * n_gt : G * n_gt + R] = True
        return QuerySet(labels, boxes.clamp(1e-4, 1 - 1e-4), valid, group, random)

    def embed(self, qs: QuerySet, d_model: int) -> dict[str, Tensor]:
        return self.embeddings[str(d_model)](qs)
