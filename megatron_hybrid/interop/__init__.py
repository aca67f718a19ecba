"""Interoperability with other ecosystems' checkpoints (Hugging Face transformers)."""

from megatron_hybrid.interop.hf import (
    HFInteropError,
    from_pretrained,
    hf_config_from_hybrid,
    hybrid_config_from_hf,
    load_hf_config,
    load_hf_state_dict,
    save_pretrained,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "HFInteropError",
    "from_pretrained",
    "hf_config_from_hybrid",
    "hybrid_config_from_hf",
    "load_hf_config",
    "load_hf_state_dict",
    "save_pretrained",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
