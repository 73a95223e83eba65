"""Hugging Face interop: a folder `MambaForCausalLM.from_pretrained` loads, and back.

The folder holds `config.json` (transformers' MambaConfig) and `model.safetensors` with every
tensor of our state dict except `lm_head.weight`: it is tied to the embeddings, and
transformers (like its own `save_pretrained`) re-ties it on load. Reading also accepts
mamba_ssm's `backbone.embedding.weight` spelling, which transformers renames the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mamba_training.errors import ModelError
from mamba_training.model.configuration import MambaConfig
from mamba_training.model.mamba import MambaLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TIED = "lm_head.weight"
_ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}  # mamba_ssm's name


def save_hf(model: MambaLM, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != _TIED}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    return out


def read_hf_config(model_dir: str | Path, scan: str = "auto") -> MambaConfig:
    path = _existing(Path(model_dir)) / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{path}: no such file (a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return MambaConfig.from_hf_dict(hf, scan=scan)


def load_hf(model_dir: str | Path, scan: str = "auto") -> MambaLM:
    """A MambaLM built from a folder's config.json, with its weights."""
    model = MambaLM(read_hf_config(model_dir, scan=scan))
    load_hf_weights(model, model_dir)
    return model


def load_hf_weights(model: MambaLM, model_dir: str | Path) -> MambaLM:
    """Copy a folder's weights into `model`; ModelError naming the tensor on any mismatch."""
    path = _existing(Path(model_dir)) / WEIGHTS_NAME
    if not path.is_file():
        raise ModelError(f"{path}: no such file (a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    loaded = {_ALIASES.get(k, k): v for k, v in loaded.items()}
    own = model.state_dict()
    unexpected = sorted(set(loaded) - set(own))
    if unexpected:
        raise ModelError(f"{path}: unexpected tensor {unexpected[0]} (this model has no such parameter)")
    for name, param in own.items():
        if name == _TIED and name not in loaded:
            continue
        if name not in loaded:
            raise ModelError(f"{path}: missing tensor {name} (shape {tuple(param.shape)})")
        if loaded[name].shape != param.shape:
            raise ModelError(
                f"{path}: tensor {name} has shape {tuple(loaded[name].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in own.items():
            if name in loaded:
                param.copy_(loaded[name])
    return model


def _existing(folder: Path) -> Path:
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    return folder
