import pytest
import torch

from mamba_training.errors import ConfigError
from mamba_training.train.precision import autocast_dtype, autocast_for


@pytest.mark.parametrize(
    "setting, device_type, bf16, expected",
    [
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, None),
        ("auto", "cpu", True, None),
        ("bf16", "cuda", True, torch.bfloat16),
        ("bf16", "cpu", True, torch.bfloat16),
        ("off", "cuda", True, None),
        ("off", "cpu", True, None),
    ],
)
def test_autocast_dtype_per_setting_and_device(setting, device_type, bf16, expected) -> None:
    assert autocast_dtype(setting, device_type, bf16) == expected


def test_bf16_on_a_gpu_without_bfloat16_names_the_gpu_and_the_alternative() -> None:
    with pytest.raises(ConfigError) as err:
        autocast_dtype("bf16", "cuda", False, "Tesla V100-SXM2-16GB")
    assert str(err.value) == ("train.amp=bf16: this GPU (Tesla V100-SXM2-16GB) has no bfloat16 support; "
                              "use train.amp=off (float32), or auto")


def test_bf16_on_the_cpu_is_cpu_autocast() -> None:
    with autocast_for("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
