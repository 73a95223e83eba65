"""MambaConfig validation and HF mapping; MambaLM initialisation, recurrent step, generate, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_training.errors import ModelError
from mamba_training.model import MambaConfig, MambaLM


def tiny(**changes) -> MambaConfig:
    return MambaConfig(**{"d_model": 16, "n_layer": 2, "vocab_size": 61, "d_state": 4, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": 0}, "model.d_model must be > 0 (got 0)"),
        ({"n_layer": -1}, "model.n_layer must be > 0 (got -1)"),
        ({"vocab_size": 0}, "model.vocab_size must be > 0 (got 0)"),
        ({"d_state": 2.5}, "model.d_state must be an integer (got 2.5)"),
        ({"dt_rank": 0}, "model.dt_rank must be 'auto' or an integer > 0 (got 0)"),
        ({"layer_norm_epsilon": 0.0}, "model.layer_norm_epsilon must be > 0 (got 0.0)"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "model.dt_min must be <= model.dt_max"),
        ({"scan": "warp"}, "model.scan: unknown scan 'warp'; choose one of: auto, chunked, reference, triton, cuda"),
    ],
)
def test_invalid_config_raises_model_error_naming_the_field(changes, message):
    with pytest.raises(ModelError) as err:
        tiny(**changes).validate()
    assert message in str(err.value)


def test_building_a_model_validates_its_config():
    with pytest.raises(ModelError, match="model.d_model must be > 0"):
        MambaLM(tiny(d_model=0))


def test_derived_sizes():
    cfg = tiny()
    assert cfg.padded_vocab_size == 64  # 61 rounded up to a multiple of 8
    assert cfg.d_inner == 32
    assert cfg.resolved_dt_rank == 1  # ceil(16 / 16)
    assert MambaConfig(d_model=100, n_layer=1, vocab_size=8).resolved_dt_rank == 7


def test_hf_dict_round_trip_keeps_the_shape():
    cfg = tiny(dt_rank=3)
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "mamba" and hf["architectures"] == ["MambaForCausalLM"]
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["state_size"], hf["vocab_size"]) == (16, 2, 4, 64)
    assert (hf["intermediate_size"], hf["time_step_rank"], hf["tie_word_embeddings"]) == (32, 3, True)
    back = MambaConfig.from_hf_dict(hf)
    assert back.to_hf_dict() == hf
    assert back.padded_vocab_size == cfg.padded_vocab_size


@pytest.mark.parametrize(
    "hf, message",
    [
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"model_type": "mamba", "num_hidden_layers": 2, "vocab_size": 8}, "missing key 'hidden_size'"),
        ({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 8, "use_bias": True},
         "use_bias=True is not supported"),
        ({"model_type": "mamba", "hidden_size": 0, "num_hidden_layers": 2, "vocab_size": 8},
         "model.d_model must be > 0"),
    ],
)
def test_unsupported_hf_config_is_a_model_error(hf, message):
    with pytest.raises(ModelError, match=message):
        MambaConfig.from_hf_dict(hf)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    cfg = tiny()
    model = MambaLM(cfg)
    mixer = model.backbone.layers[0].mixer
    expected_A_log = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1)
    torch.testing.assert_close(mixer.A_log.detach(), expected_A_log)
    assert torch.equal(mixer.D.detach(), torch.ones(cfg.d_inner))
    dt = F.softplus(mixer.dt_proj.bias.detach())  # initial step sizes, log-uniform in [dt_min, dt_max]
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.embeddings.weight.shape == (cfg.padded_vocab_size, cfg.d_model)
    std = model.backbone.embeddings.weight.std().item()
    assert math.isclose(std, 0.02, rel_tol=0.25)


def test_forward_gives_float32_logits_over_the_padded_vocab():
    model = MambaLM(tiny())
    logits = model(torch.randint(0, 61, (3, 11)))
    assert logits.shape == (3, 11, 64) and logits.dtype == torch.float32


@pytest.mark.parametrize("scan", ["chunked", "reference"])
def test_recurrent_step_equals_the_parallel_forward(scan):
    torch.manual_seed(0)
    model = MambaLM(tiny(scan=scan)).eval()
    ids = torch.randint(0, 61, (2, 23))
    with torch.no_grad():
        full = model(ids)
        states = model.init_states(2)
        stepped = torch.stack([model.step(ids[:, t], states) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)


def test_scan_backends_give_the_same_logits_and_gradients():
    torch.manual_seed(0)
    fast = MambaLM(tiny(scan="chunked"))
    ref = MambaLM(tiny(scan="reference"))
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 61, (2, 21))
    out_fast, out_ref = fast(ids), ref(ids)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    out_fast.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_generate_returns_prompt_and_requested_tokens_deterministically():
    torch.manual_seed(0)
    model = MambaLM(tiny()).eval()
    prompt = torch.tensor([[5, 6, 7], [1, 2, 3]])
    first = model.generate(prompt, max_new_tokens=9, top_k=10, generator=torch.Generator().manual_seed(4))
    again = model.generate(prompt, max_new_tokens=9, top_k=10, generator=torch.Generator().manual_seed(4))
    assert first.shape == (2, 12) and first.dtype == torch.long
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(first, again)
    assert int(first.max()) < 61  # never a padding id
    other = model.generate(prompt, max_new_tokens=9, top_k=10, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(first, other)


def test_greedy_generation_follows_the_forward_argmax():
    torch.manual_seed(0)
    model = MambaLM(tiny()).eval()
    out = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 1:, :61]  # the prediction after each prompt-or-generated token
    assert torch.equal(logits.argmax(-1), out[:, 2:])


def test_generate_refuses_an_empty_prompt_and_a_negative_count():
    model = MambaLM(tiny())
    with pytest.raises(ModelError, match="prompt must hold at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ModelError, match=r"max_new_tokens must be >= 0 \(got -1\)"):
        model.generate(torch.tensor([[1]]), -1)


def test_a_few_adamw_steps_learn_a_repeated_sequence():
    torch.manual_seed(0)
    model = MambaLM(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(32).remainder(7)[None].repeat(4, 1)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
