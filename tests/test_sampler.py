"""DefaultSampler's sharding arithmetic, checked for several world sizes without starting processes."""

import pytest

from funceng.runner import DefaultSampler


def shards(n: int, world: int, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = DefaultSampler(range(n), rank=rank, world_size=world, **kwargs)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_training_shards_have_equal_length_and_cover_every_sample(world):
    parts = shards(45, world, shuffle=True, seed=7)
    assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
    assert set().union(*parts) == set(range(45))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_evaluation_shards_hold_every_sample_exactly_once(world):
    parts = shards(45, world, shuffle=False, round_up=False)
    assert sorted(i for p in parts for i in p) == list(range(45))


def test_global_batches_are_the_same_for_any_number_of_ranks():
    (whole,) = shards(96, 1, shuffle=True, seed=3)
    halves = shards(96, 2, shuffle=True, seed=3)
    for k in range(6):  # global batch k: 16 samples on one rank, or 8 on each of two
        assert set(whole[16 * k : 16 * (k + 1)]) == set(halves[0][8 * k : 8 * (k + 1)] + halves[1][8 * k : 8 * (k + 1)])


def test_each_epoch_has_its_own_order_and_an_epoch_replays_exactly():
    sampler = DefaultSampler(range(50), shuffle=True, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first and sorted(second) == list(range(50))


def test_runner_reshuffles_config_built_loaders_every_epoch_from_seed_plus_epoch(tmp_path):
    import torch

    from funceng.runner import Hook, Runner
    from tests.runner_fixtures import TinyNet, dataset

    class RecordBatches(Hook):
        def __init__(self):
            self.seen = []

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.seen.append(data_batch[0])

    data, record = dataset(48), RecordBatches()
    Runner(
        model=TinyNet(),
        work_dir=tmp_path,
        train_dataloader=dict(dataset=data, batch_size=16, collate_fn=dict(type="default_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
        train_cfg=dict(max_epochs=2),
        randomness=dict(seed=5),
        custom_hooks=[record],
        default_hooks=dict(checkpoint=None),
    ).train()
    for epoch in range(2):
        sampler = DefaultSampler(data, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        expected = data.tensors[0][list(sampler)]
        assert torch.equal(torch.cat(record.seen[3 * epoch : 3 * epoch + 3]), expected)
    assert not torch.equal(record.seen[0], record.seen[3])
