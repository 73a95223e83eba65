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
