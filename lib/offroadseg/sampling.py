"""Which samples each epoch trains on, in which order, and the seeds of every other random draw.

`make_loaders` builds `engine.fit`'s train and val loaders from the samplers below.

Reproducibility: the order of each epoch's samples is a pure function of (seed, epoch), the
same on every process (`EpochSampler`); every other random draw of an epoch (augmentation,
loader workers' seeds, dropout and drop-path masks) comes from generators seeded at the epoch's
start from (seed, epoch, process index) (`seed_epoch`): under DDP each GPU augments its own way,
and a run stopped after epoch k and resumed ends with the same weights as one that never stopped
(exactly on CPU; GPU kernels may add float noise).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_seed(seed: int, epoch: int, stream: int, rank: int | None = None) -> int:
    """An independent, well-mixed seed per (run seed, epoch, use[, process]).

    Resuming at epoch e therefore redraws exactly what an uninterrupted run drew at epoch e.
    Streams: 0 the sample order, 1 the loader workers' seeds, 2 the global generators.
    """
    entropy = [seed, epoch, stream] + ([] if rank is None else [rank])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int, worker_seeds: torch.Generator) -> None:
    """Seed process `rank`'s random draws of `epoch` (all but the sample order) from (seed, epoch, rank).

    Per process: seeded alike, every GPU would draw the same crops, flips and jitter
    (`batch_augment.BatchAugment` and the per-sample transforms draw from torch's global generator,
    the loader workers from `worker_seeds`) and the same dropout / drop-path masks. Per epoch: a
    run resumed at epoch e draws what an uninterrupted run drew there. The sample order stays
    common to all processes (EpochSampler, stream 0), which then train on disjoint shards of it.
    """
    worker_seeds.manual_seed(epoch_seed(seed, epoch, 1, rank))
    set_seed(epoch_seed(seed, epoch, 2, rank))  # python, numpy, torch CPU and CUDA generators


class EpochSampler(Sampler[int]):
    """Train order of one epoch as a pure function of (seed, epoch).

    Without `weights`: a random permutation. With `weights` (one per sample): a weighted
    draw of len(weights) indices with replacement, the same torch.multinomial call that
    WeightedRandomSampler makes.

    Under DDP every process draws the same order (nothing to synchronise), and accelerate's
    BatchSamplerShard gives process r the batches r, r+W, r+2W, ... of it: the processes
    train on disjoint shards of one weighted draw, as one process would with a W times
    larger batch. Call `set_epoch` before each epoch (the prepared loader's set_epoch does).
    """

    def __init__(self, num_samples: int, seed: int = 0, weights: Sequence[float] | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.weights = None
        if weights is not None:
            weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if weights.shape != (num_samples,):
                raise ValueError(f"sample_weights has {weights.numel()} values for {num_samples} train samples")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("sample_weights must be finite, non-negative and not all zero")
            self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 0))
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        return iter(order.tolist())


class ShardSampler(Sampler[int]):
    """Indices rank, rank+W, rank+2W, ... of range(n), in order: this process's share of the val set.

    Not accelerate's sharding: to even out the shards it repeats samples, which would count
    them twice in the confusion matrix.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy's and python's generators seeded like torch's."""
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's
    # generator); numpy and python's random would otherwise repeat across workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class Loaders:
    train: DataLoader  # EpochSampler's order; fit replaces it with accelerate's prepared loader
    val: DataLoader  # this process's share of the val set (ShardSampler); not prepared by accelerate
    worker_seeds: torch.Generator  # draws the train loader workers' base seed; reseeded per epoch (seed_epoch)


def make_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, seed: int, num_workers: int,
                 sample_weights: Sequence[float] | None, rank: int, world_size: int, pin_memory: bool) -> Loaders:
    """The train loader (each epoch `EpochSampler`'s draw) and process `rank`'s val loader, as `engine.fit` uses them."""
    worker_seeds = torch.Generator()
    train = DataLoader(
        train_set, batch_size=batch_size, sampler=EpochSampler(len(train_set), seed, sample_weights),
        drop_last=len(train_set) >= batch_size,  # no tiny last batch for BatchNorm
        num_workers=num_workers, worker_init_fn=seed_worker, generator=worker_seeds, pin_memory=pin_memory,
    )
    # Not prepared by accelerate (see ShardSampler); `engine.evaluate` moves its batches to the device.
    val = DataLoader(
        val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), rank, world_size),
        num_workers=num_workers, worker_init_fn=seed_worker, pin_memory=pin_memory,
    )
    return Loaders(train, val, worker_seeds)
