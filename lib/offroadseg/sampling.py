"""Which samples each epoch trains on, in which order, and the seeds of every random draw.

`make_loaders` builds `engine.fit`'s train and val loaders from the samplers below.

Reproducibility: the order of each epoch's samples is a pure function of (seed, epoch), the
same on every process (`EpochSampler`), and so is each sample's own seed, which the sampler hands
out with its index: the per-sample augmentation of a train sample draws from that seed alone
(`SeededSamples`), in whichever loader worker it runs, however many there are, and whether the
workers live for one epoch or for the whole run (persistent workers keep their generators
running from epoch to epoch, so seeding the workers could not do it). Every other random draw of
an epoch (BatchAugment on the device, dropout and drop-path masks) comes from the global
generators, seeded at the epoch's start from (seed, epoch, process index) (`seed_epoch`). So under
DDP each GPU augments its own way (its batches hold other positions of the order), and a run
stopped after epoch k and resumed ends with the same weights as one that never stopped (exactly on
CPU; GPU kernels may add float noise).
"""

from __future__ import annotations

import os
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
    Streams: 0 the sample order and the samples' seeds, 2 the global generators (1 was the
    loader workers' seeds, before each sample carried its own).
    """
    entropy = [seed, epoch, stream] + ([] if rank is None else [rank])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed process `rank`'s global generators for `epoch` from (seed, epoch, rank).

    Per process: seeded alike, every GPU would draw the same crops, flips and jitter
    (`batch_augment.BatchAugment` draws from torch's global generator) and the same dropout /
    drop-path masks. Per epoch: a run resumed at epoch e draws what an uninterrupted run drew
    there. The per-sample augmentation does not draw from these (see `SeededSamples`).
    """
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

    `seeded=True` yields (index, seed) pairs instead of indices, one seed per position of the
    epoch's order (drawn from the same generator after the order), for `SeededSamples`.
    """

    def __init__(self, num_samples: int, seed: int = 0, weights: Sequence[float] | None = None, seeded: bool = False):
        self.num_samples = num_samples
        self.seed = seed
        self.seeded = seeded
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
        if not self.seeded:
            return iter(order.tolist())
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class SeededSamples:
    """`dataset` indexed by the (index, seed) pairs of `EpochSampler(seeded=True)`: each sample is made
    with python's, numpy's and torch's generators seeded from its own seed, then put back as they were.

    So a sample's random augmentation is a pure function of (run seed, epoch, position in the
    order), wherever it is made: in the main process or any loader worker, a fresh one or one that
    has served earlier epochs. Plain integer indices pass through unseeded.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a job's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, processes: int = 1, cpus: int | None = None) -> int:
    """DataLoader workers per loader for each of `processes` training processes: at most `requested`,
    and no more than the CPUs each process has, less one for the process itself.

    Kaggle's two T4s share 4 vCPUs: the full profile's 8 workers per loader there would be 32
    worker processes on 4 CPUs; this gives each of the 2 processes 1 worker per loader. A run with
    `requested` 0 loads in the main process.
    """
    if requested <= 0:
        return 0
    per_process = (usable_cpus() if cpus is None else cpus) // max(1, processes)
    return max(1, min(requested, per_process - 1))


@dataclass
class Loaders:
    train: DataLoader  # EpochSampler's order; fit replaces it with accelerate's prepared loader
    val: DataLoader  # this process's share of the val set (ShardSampler); not prepared by accelerate
    workers: int  # worker processes per loader (persistent: started once, they serve every epoch)


def make_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, seed: int, num_workers: int,
                 sample_weights: Sequence[float] | None, rank: int, world_size: int, pin_memory: bool) -> Loaders:
    """The train loader (each epoch `EpochSampler`'s draw, every sample seeded) and process `rank`'s val
    loader, as `engine.fit` uses them. `num_workers` is what is asked for; `loader_workers` decides.

    Workers are persistent: started at the first epoch and kept, so an epoch does not fork them
    anew (two loaders x workers x processes forks an epoch otherwise), and each keeps the decode
    cache's memory maps open.
    """
    workers = loader_workers(num_workers, world_size)
    # A generator of their own: a DataLoader draws its workers' base seed from it at each iterator
    # (from torch's global one otherwise, shifting the dropout and BatchAugment draws); the samples
    # draw from their own seeds, not from the workers'.
    persistent = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory)
    train = DataLoader(
        SeededSamples(train_set), batch_size=batch_size,
        sampler=EpochSampler(len(train_set), seed, sample_weights, seeded=True),
        drop_last=len(train_set) >= batch_size,  # no tiny last batch for BatchNorm
        generator=torch.Generator(), **persistent,
    )
    # Not prepared by accelerate (see ShardSampler); `engine.evaluate` moves its batches to the device.
    val = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), rank, world_size),
                     generator=torch.Generator(), **persistent)
    return Loaders(train, val, workers)
