"""`MambaConfig`: the shape and initialisation of a Mamba-1 language model, and its HF mapping.

Field names follow mamba_ssm (d_model, n_layer, ...); `to_hf_dict` / `from_hf_dict` translate
to and from transformers' `MambaConfig` JSON, so a saved model loads with
`MambaForCausalLM.from_pretrained`. transformers has no vocab padding multiple: the HF
vocab_size is our padded size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from mamba_training.errors import ModelError
from mamba_training.model.scan import check_scan_name


@dataclass(frozen=True)
class MambaConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | Literal["auto"] = "auto"  # "auto": ceil(d_model / 16)
    pad_vocab_size_multiple: int = 8
    layer_norm_epsilon: float = 1e-5
    scan: str = "auto"  # a name from mamba_training.model.available_scans(); not part of the weights
    # Initialisation (mamba_ssm / transformers defaults).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: Literal["random", "constant"] = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02  # std of the embedding init (mamba_ssm uses 0.02)
    rescale_prenorm_residual: bool = True  # out_proj /= sqrt(n_layer), as mamba_ssm does

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def validate(self) -> MambaConfig:
        """Raise ModelError naming the first bad field; return self so calls can chain."""
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelError(f"model.{name} must be an integer (got {value!r})")
            if value <= 0:
                raise ModelError(f"model.{name} must be > 0 (got {value})")
        rank = self.dt_rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ModelError(f"model.dt_rank must be 'auto' or an integer > 0 (got {self.dt_rank!r})")
        for name in ("layer_norm_epsilon", "dt_min", "dt_max", "dt_scale", "dt_init_floor", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ModelError(f"model.{name} must be > 0 (got {getattr(self, name)!r})")
        if self.dt_min > self.dt_max:
            raise ModelError(f"model.dt_min must be <= model.dt_max (got {self.dt_min} > {self.dt_max})")
        if self.dt_init not in ("random", "constant"):
            raise ModelError(f"model.dt_init must be 'random' or 'constant' (got {self.dt_init!r})")
        check_scan_name(self.scan)
        return self

    def replace(self, **changes: Any) -> MambaConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' `MambaConfig` as JSON (what `config.json` of a saved model holds)."""
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.padded_vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.resolved_dt_rank,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "residual_in_fp32": True,
            "tie_word_embeddings": True,
            "initializer_range": self.initializer_range,
            # transformers applies this rescale in _init_weights even to weights it has just
            # loaded (it divides in place), which would corrupt out_proj: the init is ours anyway.
            "rescale_prenorm_residual": False,
            "time_step_scale": self.dt_scale,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_init_scheme": self.dt_init,
            "time_step_floor": self.dt_init_floor,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], scan: str = "auto") -> MambaConfig:
        """Read transformers' `MambaConfig` JSON; ModelError for a non-Mamba or unsupported one."""
        if hf.get("model_type", "mamba") != "mamba":
            raise ModelError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'mamba'")
        for key, want in (("use_bias", False), ("use_conv_bias", True), ("tie_word_embeddings", True)):
            if hf.get(key, want) != want:
                raise ModelError(f"config.json: {key}={hf[key]!r} is not supported (this model needs {want!r})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (needs 'silu')")
        try:
            d_model = int(hf["hidden_size"])
            cfg = cls(
                d_model=d_model,
                n_layer=int(hf["num_hidden_layers"]),
                vocab_size=int(hf["vocab_size"]),
                d_state=int(hf.get("state_size", 16)),
                d_conv=int(hf.get("conv_kernel", 4)),
                expand=int(hf.get("expand", 2)),
                dt_rank=_dt_rank(hf.get("time_step_rank", "auto"), d_model),
                pad_vocab_size_multiple=1,  # the HF vocab is already the padded one
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                scan=scan,
                dt_min=float(hf.get("time_step_min", 0.001)),
                dt_max=float(hf.get("time_step_max", 0.1)),
                dt_init=hf.get("time_step_init_scheme", "random"),
                dt_scale=float(hf.get("time_step_scale", 1.0)),
                dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
                initializer_range=float(hf.get("initializer_range", 0.02)),
            )
        except KeyError as exc:
            raise ModelError(f"config.json: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"config.json: bad value ({exc})") from None
        return cfg.validate()


def _dt_rank(value: Any, d_model: int) -> int | Literal["auto"]:
    # HF writes the resolved rank; keep "auto" when it equals the default so configs compare equal.
    if value == "auto" or value == math.ceil(d_model / 16):
        return "auto"
    return int(value)
