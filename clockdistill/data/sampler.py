"""Batches for one process or one rank of a data-parallel run."""

from __future__ import annotations

import math

import torch

from clockdistill.errors import UserError


class ShardedBatchSampler:
    """Shuffled global batches of `batch_size` (one permutation per epoch from `generator`), each
    split into `world` equal, contiguous shares: rank r trains on share r. One process (world 1)
    sees exactly the batches a shuffled DataLoader with that generator gives; W ranks together see
    the same global batches, which is what makes data-parallel steps equal single-process ones."""

    def __init__(
        self, n: int, batch_size: int, drop_last: bool, generator: torch.Generator, world: int = 1, rank: int = 0
    ):
        if batch_size % world:
            raise UserError(
                f"train.batch_size: {batch_size} does not split evenly over {world} workers (the global batch is "
                "shared)"
            )
        self.n, self.batch_size, self.generator, self.world, self.rank = n, batch_size, generator, world, rank
        self.drop_last = drop_last or world > 1  # every rank must take every step

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        share = self.batch_size // self.world
        for k in range(len(self)):
            batch = perm[k * self.batch_size : (k + 1) * self.batch_size]
            yield batch[self.rank * share : (self.rank + 1) * share] if self.world > 1 else batch
