"""The sample order of each epoch, each sample's seed and the per-epoch seeds: pure functions of
(seed, epoch[, process]), whatever the loader workers; and how many workers each process gets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, Dataset, WeightedRandomSampler

from offroadseg.sampling import EpochSampler, epoch_seed, loader_workers, make_loaders, seed_epoch, usable_cpus


def test_weighted_epoch_sampler_is_one_draw_sharded_across_processes():
    weights = [100.0] + [1.0] * 39
    sampler = EpochSampler(40, seed=7, weights=weights)
    sampler.set_epoch(3)
    draw = list(sampler)
    assert list(sampler) == draw  # a pure function of (seed, epoch): resumable
    sampler.set_epoch(4)
    assert list(sampler) != draw
    sampler.set_epoch(3)
    assert draw.count(0) > 10  # the weights are used, with replacement
    # The same draw WeightedRandomSampler makes with the same generator state.
    reference = WeightedRandomSampler(weights, 40, replacement=True,
                                      generator=torch.Generator().manual_seed(epoch_seed(7, 3, 0)))
    assert list(reference) == draw

    # Two processes: accelerate hands out alternate batches of the one draw, disjoint and complete.
    batches = list(BatchSampler(sampler, batch_size=4, drop_last=True))
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=True), num_processes=2, process_index=rank))
              for rank in (0, 1)]
    assert shards[0] != shards[1]
    assert [batch for pair in zip(*shards) for batch in pair] == batches

    with pytest.raises(ValueError, match="3 values for 40"):
        EpochSampler(40, weights=[1.0, 2.0, 3.0])


def test_epoch_seeds_differ_per_process_and_epoch_only():
    def seeds(rank, epoch):
        seed_epoch(0, epoch, rank)
        return torch.rand(3).tolist()

    assert seeds(0, 1) == seeds(0, 1)
    assert seeds(0, 1) != seeds(1, 1)
    assert seeds(0, 1) != seeds(0, 2)
    assert epoch_seed(0, 1, 2, 1) != epoch_seed(0, 2, 2, 0)  # no (rank, epoch) collisions as with seed + rank


class Draws(Dataset):
    """Each sample: a draw of torch's, numpy's and python's generators, made where the sample is made."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([index, torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)


def epoch_draws(loader, epochs=(1, 2)) -> list:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_a_samples_draws_depend_on_its_seed_alone_not_on_the_workers():
    # In the main process, in one fresh worker, in two persistent workers that served epoch 1
    # already, or resumed at epoch 2: every sample draws the same augmentation.
    made = {workers: make_loaders(Draws(), Draws(), 4, seed=3, num_workers=workers, sample_weights=None, rank=0,
                                  world_size=1, pin_memory=False) for workers in (0, 1, 2)}
    assert made[0].workers == 0 and made[2].train.persistent_workers and made[2].val.persistent_workers
    reference = epoch_draws(made[0].train)
    for workers in (1, 2):
        for got, want in zip(epoch_draws(made[workers].train), reference):
            assert torch.equal(got, want), workers
    resumed = make_loaders(Draws(), Draws(), 4, 3, 2, None, 0, 1, False)
    assert torch.equal(epoch_draws(resumed.train, epochs=(2,))[0], reference[1])
    assert not torch.equal(reference[0][:, 1:], reference[1][:, 1:])  # and epochs differ
    # The main process's generators are as they were (dropout and BatchAugment draw from them).
    torch.manual_seed(5)
    before = torch.rand(2)
    torch.manual_seed(5)
    epoch_draws(made[0].train)
    assert torch.equal(torch.rand(2), before)


def test_processes_get_disjoint_positions_so_each_augments_its_own_way():
    sampler = EpochSampler(16, seed=1, seeded=True)
    sampler.set_epoch(2)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=True), num_processes=2, process_index=rank))
              for rank in (0, 1)]
    seeds = [{seed for batch in shard for _, seed in batch} for shard in shards]
    assert len(seeds[0]) == len(seeds[1]) == 8 and not seeds[0] & seeds[1]
    plain = EpochSampler(16, seed=1)
    plain.set_epoch(2)
    assert [index for index, _ in sampler] == list(plain)  # the same order as unseeded


def test_loader_workers_follow_the_cpus_of_each_process():
    assert loader_workers(8, processes=1, cpus=16) == 8  # an H200 machine
    assert loader_workers(8, processes=2, cpus=4) == 1  # Kaggle's two T4s on 4 vCPUs
    assert loader_workers(8, processes=1, cpus=2) == 1
    assert loader_workers(0, processes=1, cpus=16) == 0  # the main process loads
    assert 1 <= loader_workers(64) <= max(1, usable_cpus() - 1)
