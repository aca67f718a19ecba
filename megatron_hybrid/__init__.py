"""megatron_hybrid: train and serve hybrid Mamba-2 / attention language models, on a laptop CPU or many GPUs."""

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.layer_pattern import allocate_layers
from megatron_hybrid.models.mamba_model import MambaModel, count_parameters
from megatron_hybrid.spec import ModuleSpec, build_module


def from_pretrained(path, dtype=None) -> MambaModel:
    """Load a transformers NemotronH or Mamba2 directory (config.json + safetensors) as a MambaModel."""
    from megatron_hybrid.interop.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=dtype)


__all__ = [
    "HybridConfig",
    "MambaModel",
    "ModuleSpec",
    "allocate_layers",
    "build_module",
    "count_parameters",
    "from_pretrained",
]
__version__ = "0.1.0"
