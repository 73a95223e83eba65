"""The Mamba-1 language model: config, module, selective-scan backends, Hugging Face interop.

Imports nothing from the rest of the package except `mamba_training.errors`.
"""

from mamba_training.model.configuration import MambaConfig
from mamba_training.model.hf import load_hf, load_hf_weights, read_hf_config, save_hf
from mamba_training.model.mamba import MambaLM
from mamba_training.model.scan import available_scans, get_scan

__all__ = [
    "MambaConfig",
    "MambaLM",
    "available_scans",
    "get_scan",
    "load_hf",
    "load_hf_weights",
    "read_hf_config",
    "save_hf",
]
