"""BatchSampler and eval_batches: determinism, resume, rank slices, world-size changes, bad sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamba_training.data import BatchSampler, TokenDataset, eval_batches, prepare_corpus
from mamba_training.errors import ConfigError, DataError


@pytest.fixture
def train_data(text_folder: Path, tmp_path: Path) -> TokenDataset:
    prepare_corpus([text_folder], tmp_path / "prepared", shard_tokens=7000)  # several shards
    return TokenDataset(tmp_path / "prepared", "train")


def _batches(sampler: BatchSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def test_batches_have_the_right_shape_and_targets_are_inputs_shifted(train_data: TokenDataset) -> None:
    x, y = BatchSampler(train_data, seq_len=32, batch_size=6, seed=1).next_batch()
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row is a real window of the split: x then the one token y adds at the end.
    sampler = BatchSampler(train_data, seq_len=32, batch_size=6, seed=1)
    for row, offset in enumerate(sampler.batch_offsets(0)):
        window = torch.from_numpy(train_data.window(offset, 33))
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])


def test_same_seed_same_batches_and_another_seed_other_batches(train_data: TokenDataset) -> None:
    a = _batches(BatchSampler(train_data, 16, 4, seed=7), 5)
    b = _batches(BatchSampler(train_data, 16, 4, seed=7), 5)
    c = _batches(BatchSampler(train_data, 16, 4, seed=8), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(torch.cat([p[0] for p in a]), torch.cat([p[0] for p in c]))
    assert not torch.equal(a[0][0], a[1][0])  # steps differ from each other


def test_resume_from_state_dict_continues_exactly(train_data: TokenDataset) -> None:
    uninterrupted = _batches(BatchSampler(train_data, 16, 4, seed=3), 8)

    first = BatchSampler(train_data, 16, 4, seed=3)
    before = _batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON survives a round trip
    assert state == {"seed": 3, "step": 3, "tokens_consumed": 3 * 4 * 16}
    second = BatchSampler(train_data, 16, 4, seed=999)  # the saved seed wins
    second.load_state_dict(state)
    after = _batches(second, 5)
    for (x, y), (ux, uy) in zip(before + after, uninterrupted):
        assert torch.equal(x, ux) and torch.equal(y, uy)
    assert second.state_dict() == {"seed": 3, "step": 8, "tokens_consumed": 8 * 4 * 16}


def test_rank_slices_are_disjoint_and_concatenate_to_the_global_batch(train_data: TokenDataset) -> None:
    whole = _batches(BatchSampler(train_data, 16, 8, seed=5), 3)
    for world in (2, 4):
        ranks = [_batches(BatchSampler(train_data, 16, 8, seed=5, rank=r, world_size=world), 3) for r in range(world)]
        for step in range(3):
            parts = [ranks[r][step][0] for r in range(world)]
            assert all(p.shape == (8 // world, 16) for p in parts)
            assert torch.equal(torch.cat(parts), whole[step][0])
            assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world)]), whole[step][1])
    offsets = [BatchSampler(train_data, 16, 8, seed=5, rank=r, world_size=2).batch_offsets(0) for r in range(2)]
    assert offsets[0] + offsets[1] == BatchSampler(train_data, 16, 8, seed=5).batch_offsets(0)


def test_resuming_on_another_world_size_sees_the_same_data(train_data: TokenDataset) -> None:
    single = BatchSampler(train_data, 16, 4, seed=11)
    _batches(single, 2)
    state = single.state_dict()
    expected = _batches(single, 2)
    resumed = []
    for rank in range(2):
        sampler = BatchSampler(train_data, 16, 4, seed=11, rank=rank, world_size=2)
        sampler.load_state_dict(state)
        resumed.append(_batches(sampler, 2))
        assert sampler.state_dict()["tokens_consumed"] == 4 * 4 * 16  # global tokens, not per rank
    for step in range(2):
        assert torch.equal(torch.cat([resumed[0][step][0], resumed[1][step][0]]), expected[step][0])


def test_batch_size_not_divisible_by_world_size_is_a_config_error(train_data: TokenDataset) -> None:
    with pytest.raises(ConfigError, match="train.batch_size 6 must be a positive multiple of the world size 4"):
        BatchSampler(train_data, 16, 6, seed=0, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="rank 2 is not within world size 2"):
        BatchSampler(train_data, 16, 4, seed=0, rank=2, world_size=2)


def test_sequence_longer_than_the_split_is_a_data_error(train_data: TokenDataset) -> None:
    with pytest.raises(DataError, match=f"has {len(train_data)} tokens, fewer than seq_len"):
        BatchSampler(train_data, len(train_data), 2, seed=0)
    with pytest.raises(DataError, match="sampler state .* is malformed"):
        BatchSampler(train_data, 16, 2, seed=0).load_state_dict({"seed": 0})


def test_eval_batches_are_fixed_and_cover_the_split(train_data: TokenDataset) -> None:
    a = eval_batches(train_data, 16, 4, 3, seed=2)
    b = eval_batches(train_data, 16, 4, 3, seed=2)
    assert len(a) == 3 and all(x.shape == y.shape == (4, 16) for x, y in a)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in a)
    # Windows are spread over the whole split: the last one starts in its final twelfth.
    last_row = a[-1][0][-1]
    tail = torch.from_numpy(train_data.window(len(train_data) - len(train_data) // 12, len(train_data) // 12))
    assert any(torch.equal(tail[i:i + 16], last_row) for i in range(len(tail) - 16))
