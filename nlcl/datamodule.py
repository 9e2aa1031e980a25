"""Lightning datamodules over a task stream, one experience at a time.

`ContinualDataModule(stream)` is the data side of a run: `set_experience(i)` selects experience i;
`train_dataloader()` serves what the strategy trains on there (its data transform: joint, cumulative,
...), `test_dataloader()` one loader per experience (a row of R is one pass over them) and
`val_dataloader()` one per experience that carries a validation set.

Batches are cut the same way on one process and on many. A seeded permutation of the training set
is cut into global batches of `batch_size`; on N ranks every rank takes its contiguous share of each
global batch, so the N shares of step k together are exactly the single-process batch k. The
permutation is drawn from the same generator, in the same order, as `DataLoader(shuffle=True,
generator=g)` draws it, which is what single-process runs have always used.
"""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset,
                              default_collate)

from nlcl import distributed as D
from nlcl.streams.base import TaskStream


def trim_padding(pad_id: int):
    """Collate that drops the padding columns every sequence of the batch has (right padding).

    Causal models read a sequence's last real token, so trailing pads never change an output;
    cutting them saves the work of attending over them.
    """

    def collate(items):
        x, y = default_collate(items)
        if x.dtype == torch.long and x.dim() == 2:
            length = int((x != pad_id).any(0).nonzero().max()) + 1 if (x != pad_id).any() else 1
            x = x[:, :length]
            if y.dim() == 2:
                y = y[:, :length]
        return x, y

    return collate


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of every global batch of a (shuffled) pass over `n` items.

    With `generator`, the global batches are those of `BatchSampler(RandomSampler(generator))`; give
    the DataLoader the same generator and every draw happens as in `DataLoader(shuffle=True,
    generator=generator)`, pass after pass. Every rank yields the same number
    of batches (one per global batch); a share may be empty when the last global batch has fewer
    items than there are ranks.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def share_sizes(self, batch_idx: int) -> tuple[int, int]:
        """(items of this rank's share, items of the global batch) at step `batch_idx` of a pass."""
        m = min(self.batch_size, self.n - batch_idx * self.batch_size)
        lo, hi = D.share(m, self.rank, self.world_size)
        return hi - lo, m

    def __iter__(self):
        # torch's own samplers make the global batches, so the order and the generator draws (one
        # permutation per pass, and one more when a pass runs out mid-batch) are DataLoader(shuffle)'s
        order = RandomSampler(range(self.n), generator=self.generator) if self.generator is not None \
            else SequentialSampler(range(self.n))
        for batch in BatchSampler(order, self.batch_size, drop_last=False):
            lo, hi = D.share(len(batch), self.rank, self.world_size)
            # an empty share still takes part in the step (DDP's all-reduce) with a stand-in sample
            # whose loss the learner weights by 0 (see `share_sizes`)
            yield batch[lo:hi] if hi > lo else batch[:1]


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """This rank's contiguous share of an evaluation set (the whole set on one process)."""
    if world == 1:
        return dataset
    lo, hi = D.share(len(dataset), rank, world)
    if hasattr(dataset, "subset"):
        return dataset.subset(torch.arange(lo, hi))
    return Subset(dataset, range(lo, hi))


class ContinualDataModule(L.LightningDataModule):
    """Train / test / validation dataloaders of one experience of `stream` at a time.

    `train_transform(stream, i)` gives the training set of experience i (a strategy's
    `train_dataset`; default: the experience's own training data). The rank and number of ranks
    come from the process group when there is one; pass them to build one rank's loaders yourself.
    Subclass it to change how batches are made (workers, another collate, another sampler); the
    runner only calls `set_experience`, `train_set`, `train_dataloader` and `test_dataloaders`.
    """

    def __init__(self, stream: TaskStream, batch_size: int, eval_batch_size: int = 512, seed: int = 0,
                 train_transform: Callable[[TaskStream, int], Dataset] | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.stream = stream
        self.batch_size, self.eval_batch_size, self.seed = int(batch_size), int(eval_batch_size), int(seed)
        self.train_transform = train_transform or (lambda s, i: s.experiences[i].train)
        self._rank, self._world = rank, world_size
        self.experience = 0
        self._train: Dataset | None = None

    @property
    def rank(self) -> int:
        return D.rank() if self._rank is None else self._rank

    @property
    def world_size(self) -> int:
        return D.world_size() if self._world is None else self._world

    def set_experience(self, index: int) -> "ContinualDataModule":
        if not 0 <= index < len(self.stream):
            raise IndexError(f"experience {index} outside 0..{len(self.stream) - 1} of stream '{self.stream.name}'")
        self.experience, self._train = index, None
        return self

    def train_set(self) -> Dataset:
        """What experience `experience` trains on (built once per experience)."""
        if self._train is None:
            self._train = self.train_transform(self.stream, self.experience)
        return self._train

    def collate(self):
        return trim_padding(self.stream.pad_id)

    def train_dataloader(self) -> DataLoader:
        data = self.train_set()
        g = torch.Generator().manual_seed(self.seed * 1000 + self.experience)
        sampler = GlobalBatchSampler(len(data), self.batch_size, g, self.rank, self.world_size)
        return DataLoader(data, batch_sampler=sampler, generator=g, collate_fn=self.collate())

    def batch_share(self, batch_idx: int) -> tuple[int, int]:
        """(this rank's samples, the global batch's samples) at training step `batch_idx` of a pass."""
        return GlobalBatchSampler(len(self.train_set()), self.batch_size, None, self.rank,
                                  self.world_size).share_sizes(batch_idx)

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(shard(dataset, self.rank, self.world_size), batch_size=self.eval_batch_size,
                          shuffle=False, collate_fn=self.collate())

    def test_dataloaders(self, stream: TaskStream | None = None) -> list[DataLoader]:
        """One loader per experience of `stream` (default: this module's), over this rank's share."""
        return [self.eval_loader(e.test) for e in (stream or self.stream).experiences]

    def test_dataloader(self) -> list[DataLoader]:
        return self.test_dataloaders()

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(e.val) for e in self.stream.experiences if getattr(e, "val", None) is not None]


def default_datamodule(stream: TaskStream, cfg, train_transform) -> ContinualDataModule:
    """The datamodule a run uses unless it is handed another factory of the same signature."""
    return ContinualDataModule(stream, int(cfg.trainer.batch_size), int(cfg.trainer.eval_batch_size),
                               int(cfg.seed), train_transform)
