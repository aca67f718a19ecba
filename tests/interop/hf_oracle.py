"""Tiny, randomly perturbed transformers models used as the correctness oracle for the Hugging Face interop.

Every parameter is moved away from its initial value (norm scales, D, dt_bias, A_log included), so a conversion that
drops, transposes or mis-orders any tensor changes the logits.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_nemotron_h_config(**overrides) -> transformers.NemotronHConfig:
    """Two Mamba groups, GQA (4 query heads / 2 kv heads), odd vocab; overrides replace any field."""
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention", "full_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        ssm_state_size=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        expand=2,
        conv_kernel=4,
        chunk_size=8,
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return transformers.NemotronHConfig(**fields)


def tiny_mamba2_config(**overrides) -> transformers.Mamba2Config:
    fields = dict(
        vocab_size=53,
        hidden_size=32,
        num_hidden_layers=3,
        num_heads=8,
        head_dim=8,
        state_size=8,
        n_groups=2,
        expand=2,
        conv_kernel=4,
        chunk_size=8,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return transformers.Mamba2Config(**fields)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, dt_bias_range: tuple[float, float] = (-9.0, 1.0)) -> None:
    """Fill every parameter with seeded random values of a realistic scale.

    ``dt_bias`` spans very negative values by default so that ``softplus(dt)`` falls below the lower bound of a
    ``time_step_limit`` clamp for some tokens and heads, exercising that clamp too where a test sets one.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator)

        if name.endswith("A_log"):
            value = torch.log(torch.empty(param.shape).uniform_(1.0, 12.0, generator=generator))
        elif name.endswith("dt_bias"):
            low, high = dt_bias_range
            value = torch.empty(param.shape).uniform_(low, high, generator=generator)
        elif name.endswith(".D"):
            value = randn(*param.shape)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            value = 1.0 + 0.3 * randn(*param.shape)
        elif "conv1d" in name:
            value = 0.4 * randn(*param.shape)
        elif name.endswith("embeddings.weight"):
            value = randn(*param.shape)
        elif param.dim() == 2:
            value = randn(*param.shape) / math.sqrt(param.shape[1])
        else:
            value = 0.3 * randn(*param.shape)
        param.copy_(value.to(param.dtype))


def build_hf_model(config, seed: int = 0, **perturb_kwargs) -> torch.nn.Module:
    """A float32 eval-mode NemotronHForCausalLM / Mamba2ForCausalLM with perturbed parameters (eager attention)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    if config.model_type == "nemotron_h":
        model = transformers.NemotronHForCausalLM(config)
    else:
        model = transformers.Mamba2ForCausalLM(config)
    perturb_(model, seed, **perturb_kwargs)
    return model.float().eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours - reference| / max|reference|: the error measured against the scale of the reference logits."""
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


@torch.no_grad()
def greedy_ours(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding as repeated full forward passes + argmax (no cache): the simplest possible reference."""
    ids = input_ids
    for _ in range(new_tokens):
        logits = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()
