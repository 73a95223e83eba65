from mamba_training.config import build_config
from mamba_training.train.optim import lr_factor


def test_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    cfg = build_config({}, ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == 0.1 and abs(factors[9] - 1.0) < 1e-12
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert abs(lr_factor(100, cfg) - 0.1) < 1e-12


def test_no_warmup_starts_at_peak() -> None:
    cfg = build_config({}, ["train.warmup_steps=0", "train.max_steps=10"]).train
    assert lr_factor(0, cfg) == 1.0


def test_adamw_is_fused_on_cuda_and_a_fixed_order_loop_elsewhere() -> None:
    from mamba_training.train.optim import adamw_implementation

    assert adamw_implementation("cuda") == {"fused": True}
    assert adamw_implementation("cpu") == {"foreach": False}
    assert adamw_implementation("mixed") == {"foreach": False}


def test_a_cpu_model_gets_the_per_parameter_adamw() -> None:
    import torch

    from mamba_training.model import MambaConfig, MambaLM
    from mamba_training.train.optim import build_optimizer

    model = MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=16, d_state=2))
    optimizer = build_optimizer(model, build_config({}, []).train)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["foreach"] is False and not g["fused"] for g in optimizer.param_groups)
