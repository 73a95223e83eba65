"""Every rank's RNG state: saved per rank, restored per rank, derived when the world size changed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mamba_training.train.state import (
    TrainState,
    cuda_devices_to_restore,
    derived_seed,
    rng_state,
    set_cuda_rng_states,
    set_rng_state,
)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def rank_state(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return rng_state()


def test_each_rank_restores_its_own_state_when_the_world_size_matches() -> None:
    saved = TrainState(seed=1, rank=0, world_size=2)
    saved._rng_ranks = [rank_state(100), rank_state(200)]  # what capture_rng gathers on rank 0
    saved.step, saved.tokens_seen = 12, 3072
    state = saved.state_dict()
    set_rng_state(state["rng_ranks"][1])
    expected = draws()

    random.seed(9)
    restored = TrainState(seed=1, rank=1, world_size=2)
    restored.load_state_dict(state)
    assert (restored.step, restored.tokens_seen) == (12, 3072)
    assert draws() == expected


def test_another_world_size_derives_each_ranks_state_from_seed_step_and_rank() -> None:
    state = {"step": 12, "tokens_seen": 0, "rng_ranks": [rank_state(100), rank_state(200)]}
    results = []
    for rank in (0, 1, 2, 0):
        TrainState(seed=1, rank=rank, world_size=3).load_state_dict(state)
        results.append(draws())
    assert results[0] == results[3]  # reproducible
    assert len({results[0], results[1], results[2]}) == 3  # and different per rank


def test_a_single_process_saves_its_own_state_without_a_gather() -> None:
    rank_state(5)
    state = TrainState().state_dict()
    expected = draws()
    TrainState().load_state_dict(state)
    assert draws() == expected


def test_a_checkpoint_from_before_per_rank_rng_still_restores() -> None:
    own = rank_state(7)
    legacy = {"step": 3, "tokens_seen": 9, "rng_python": own["python"], "rng_numpy": own["numpy"],
              "rng_torch": own["torch"]}
    expected = draws()
    TrainState().load_state_dict(legacy)
    assert draws() == expected


@pytest.mark.parametrize(("saved", "devices", "restored"), [
    (["0", "1", "2", "3", "4", "5", "6", "7"], 0, []),
    (["0", "1", "2", "3", "4", "5", "6", "7"], 1, [0]),
    (["3", "1", "0", "2"], 2, [0, 1]),
    (["0"], 4, [0]),
    ([], 8, []),
])
def test_cuda_generators_are_restored_for_the_devices_that_exist(saved, devices, restored) -> None:
    assert cuda_devices_to_restore(saved, devices) == restored


def test_a_state_from_a_machine_with_more_gpus_restores_here_without_crashing() -> None:
    fabricated = {str(i): torch.zeros(16, dtype=torch.uint8) for i in range(8)}
    expected = list(range(min(8, torch.cuda.device_count())))
    assert set_cuda_rng_states(fabricated) == expected
    state = {**rank_state(3), "cuda": fabricated}
    want = draws()
    set_rng_state(state)
    assert draws() == want


def test_derived_seeds_depend_on_seed_step_and_rank() -> None:
    seeds = {derived_seed(s, t, r) for s in (1, 2) for t in (0, 10) for r in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(1, 10, 1) == derived_seed(1, 10, 1)
