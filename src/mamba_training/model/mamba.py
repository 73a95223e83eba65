"""The Mamba-1 language model: embeddings, residual Mamba blocks, final RMSNorm, tied LM head.

Module names and parameter shapes are those of transformers' `MambaForCausalLM`, so a state
dict moves between the two unchanged (`hf.py` reads and writes the files). The forward pass is
transformers' slow path, computed the same way, except that the selective scan is a
pluggable backend (`scan/`) and the depthwise causal convolution is four shifted
multiply-adds in (batch, time, channel) layout, which saves two transposes per layer.
`generate` runs the recurrent form: one token at a time with a conv window and an SSM state per
layer, linear in the number of tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba_training.errors import ModelError
from mamba_training.model.configuration import MambaConfig
from mamba_training.model.fused import fused_mixer
from mamba_training.model.scan import SCANS, resolve_scan_name
from mamba_training.model.scan.chunked import DEFAULT_CHUNK


class MambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = _wide(hidden)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv -> SiLU -> selective scan (gated by SiLU(z)) -> out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, d_state, dt_rank = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.chunk = DEFAULT_CHUNK  # time steps per chunk of the fused path (a speed knob, not a weight)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real A, D = 1, and dt_proj such that softplus(bias) is log-uniform in [dt_min, dt_max]."""
        cfg = self.cfg
        A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).expand(cfg.d_inner, -1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        std = cfg.resolved_dt_rank**-0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        ).clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden)
        A = -torch.exp(_wide(self.A_log))
        scan_name = resolve_scan_name(self.cfg.scan, hidden.device)
        if scan_name == "chunked":  # the same computation, fused into one autograd node (fused.py)
            conv, dt_proj = self.conv1d, self.dt_proj
            return fused_mixer(xz, conv.weight, conv.bias, self.x_proj.weight, dt_proj.weight, dt_proj.bias,
                               A, self.D, self.out_proj.weight, chunk=self.chunk)
        x, z = xz.chunk(2, dim=-1)
        # Dtypes as mamba_ssm's kernel requires: x, delta, B, C, z in the activation dtype (bf16
        # under autocast: in_proj's, x_proj's and this F.linear's output), A, D, bias in float32.
        x = F.silu(_causal_conv(x, self.conv1d.weight, self.conv1d.bias, hidden.shape[1]))
        dt_low, B, C = self.x_proj(x).split([self.cfg.resolved_dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        delta = F.linear(dt_low, self.dt_proj.weight)  # the bias is added inside the scan, before softplus
        y = SCANS[scan_name](x, delta, A, B, C, _wide(self.D), z, _wide(self.dt_proj.bias))
        return self.out_proj(y.to(hidden.dtype))

    def step(self, hidden: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token (batch, d_model) through the recurrent form; updates `state` in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        window = state["conv"]  # (batch, d_inner, d_conv): the last d_conv inputs
        window.copy_(torch.roll(window, shifts=-1, dims=-1))
        window[:, :, -1] = x
        x = F.silu((window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        dt_low, B, C = self.x_proj(x).split([self.cfg.resolved_dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        A = -torch.exp(_wide(self.A_log))
        ssm = state["ssm"]  # (batch, d_inner, d_state)
        ssm.mul_(torch.exp(dt[:, :, None] * A)).add_((dt * x)[:, :, None] * B[:, None, :])
        y = (ssm @ C[:, :, None]).squeeze(-1) + self.D * x
        return self.out_proj(y * F.silu(z))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, unchanged otherwise (HF's `.float()`, but float64-safe)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int) -> torch.Tensor:
    """Depthwise causal conv over time of x (batch, L, channels); weight (channels, 1, K).

    Computed in float32 for half-precision x and returned in x's dtype, like mamba_ssm's
    causal_conv1d: the scan kernels need x in the same dtype as delta, B, C and z, which
    autocast produces in bf16 (left to type promotion, float32 weights would make x float32).
    """
    k = weight.shape[-1]
    w = weight[:, 0, :].t()  # (K, channels)
    dtype = x.dtype
    padded = F.pad(_wide(x), (0, 0, k - 1, 0))
    out = padded[:, k - 1 :] * w[k - 1]
    if bias is not None:
        out = out + bias
    for i in range(k - 1):
        out = out.addcmul(padded[:, i : i + length], w[i])
    return out.to(dtype)


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = MambaRMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.mixer = MambaMixer(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The residual stream stays float32 (HF residual_in_fp32) even under autocast.
        return _wide(hidden) + self.mixer(self.norm(hidden))


class MambaBackbone(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = MambaRMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm_f(hidden)


class MambaLM(nn.Module):
    """Mamba-1 causal LM; `forward(input_ids (B, L)) -> float32 logits (B, L, padded_vocab)`."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.backbone = MambaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight  # tied, as in HF (tie_word_embeddings)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # mamba_ssm's _init_weights: embeddings N(0, 0.02); linear biases zero except dt_proj's;
        # out_proj scaled by 1/sqrt(n_layer) so the residual stream does not grow with depth.
        nn.init.normal_(self.backbone.embeddings.weight, std=self.config.initializer_range)
        for layer in self.backbone.layers:
            if self.config.rescale_prenorm_residual:
                layer.mixer.out_proj.weight /= math.sqrt(self.config.n_layer)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids)
        return _wide(self.lm_head(hidden.to(self.lm_head.weight.dtype)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    def init_states(self, batch: int) -> list[dict[str, torch.Tensor]]:
        """Zero recurrent state for `step`: per layer a conv window and an SSM state."""
        cfg, p = self.config, self.lm_head.weight
        return [
            {
                "conv": p.new_zeros(batch, cfg.d_inner, cfg.d_conv),
                "ssm": p.new_zeros(batch, cfg.d_inner, cfg.d_state, dtype=torch.float32),
            }
            for _ in range(cfg.n_layer)
        ]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, states: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Logits (batch, padded_vocab) for one token per row, given and updating `states`."""
        hidden = self.backbone.embeddings(tokens)
        for layer, state in zip(self.backbone.layers, states):
            hidden = _wide(hidden) + layer.mixer.step(layer.norm(hidden), state)
        hidden = self.backbone.norm_f(hidden)
        return _wide(self.lm_head(hidden.to(self.lm_head.weight.dtype)))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Prompt (batch, P) followed by `max_new_tokens` sampled tokens: (batch, P + max_new_tokens).

        temperature <= 0 picks the most likely token. Only ids below the real vocab_size are
        sampled (the padding rows of the embedding are never produced).
        """
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.shape[1] == 0:
            raise ModelError("generate: the prompt must hold at least one token")
        if max_new_tokens < 0:
            raise ModelError(f"generate: max_new_tokens must be >= 0 (got {max_new_tokens})")
        states = self.init_states(prompt_ids.shape[0])
        for t in range(prompt_ids.shape[1]):
            logits = self.step(prompt_ids[:, t], states)
        out = [prompt_ids]
        for i in range(max_new_tokens):
            token = _sample(logits[:, : self.config.vocab_size], temperature, top_k, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(token, states)
        return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
