"""The sample order of each epoch and the per-epoch seeds: pure functions of (seed, epoch[, process])."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, WeightedRandomSampler

from offroadseg.sampling import EpochSampler, epoch_seed, seed_epoch


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
        generator = torch.Generator()
        seed_epoch(0, epoch, rank, generator)
        return generator.initial_seed(), torch.rand(3).tolist()

    assert seeds(0, 1) == seeds(0, 1)
    assert seeds(0, 1) != seeds(1, 1)
    assert seeds(0, 1) != seeds(0, 2)
    assert seeds(1, 1)[0] != seeds(0, 2)[0]  # no (rank, epoch) collisions as with seed + rank
