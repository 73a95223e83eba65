import torch

from mamba_training.train.distributed import DistInfo, all_reduce_max, all_reduce_mean, backends


def test_gpus_send_gradients_over_nccl_and_control_values_over_gloo() -> None:
    assert backends("cuda") == ("nccl", "gloo")
    assert backends("cpu") == ("gloo", None)


def test_a_single_process_reduces_to_its_own_value_without_a_group() -> None:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert all_reduce_max(2.0, info) == 2.0 and all_reduce_mean(3.5, info) == 3.5
