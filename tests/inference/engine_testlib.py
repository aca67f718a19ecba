"""Shared pieces of the engine tests: small perturbed hybrid models, full-forward oracles, toy tokenizers.

The module name is unique across test folders (pytest puts each test folder on sys.path).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel

INTEROP_TESTS = Path(__file__).resolve().parents[1] / "interop"
TOLERANCE = 1e-4  # relative: max|ours - reference| / max|reference|

BASE = dict(
    hidden_size=32,
    vocab_size=61,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=48,
    mamba_state_dim=8,
    mamba_head_dim=8,
    mamba_num_heads=8,
    mamba_num_groups=2,
    mamba_chunk_size=8,
    max_position_embeddings=64,
)

# name: HybridConfig overrides. Every layer type, RoPE on / off (and partial), GQA / MHA / MQA, Mamba groups 1 / 2 / 4,
# a dt clamp, biases, the other activations, a float32 residual stream.
VARIANTS: dict[str, dict] = {
    "mamba_ngroups2": dict(hybrid_override_pattern="MMM"),
    "mamba_ngroups4_dt_limit": dict(hybrid_override_pattern="MM", mamba_num_groups=4, mamba_dt_limit=(0.01, 0.5)),
    "mamba_ngroups1_no_conv_bias": dict(hybrid_override_pattern="M-M", mamba_num_groups=1, mamba_conv_bias=False),
    "attention_rope_gqa": dict(hybrid_override_pattern="*-*-", position_embedding_type="rope"),
    "attention_partial_rope_mqa": dict(
        hybrid_override_pattern="*-", position_embedding_type="rope", rotary_percent=0.5, num_query_groups=1
    ),
    "attention_no_rope_mha": dict(hybrid_override_pattern="*-*", num_query_groups=4),
    "hybrid_rope_swiglu_bias": dict(
        hybrid_override_pattern="M*-M*-", position_embedding_type="rope", activation="swiglu", add_bias_linear=True
    ),
    "hybrid_gelu_fp32_residual_tied": dict(
        hybrid_override_pattern="M-*M", activation="gelu", residual_in_fp32=True,
        untie_embeddings_and_output_weights=False,
    ),
}


def make_config(variant: str, **overrides) -> HybridConfig:
    fields = {**BASE, **VARIANTS[variant], **overrides}
    fields["num_layers"] = len(fields["hybrid_override_pattern"])
    return HybridConfig(**fields)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter to a seeded random value of realistic scale, so that no wrongly wired tensor (norm scale,
    D, dt_bias, bias) goes unnoticed; dt_bias spans very small to large time steps (and any dt clamp)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        shape = param.shape
        if name.endswith("A_log"):
            value = torch.log(torch.empty(shape).uniform_(1.0, 12.0, generator=generator))
        elif name.endswith("dt_bias"):
            value = torch.empty(shape).uniform_(-6.0, 1.0, generator=generator)
        elif name.endswith(".D"):
            value = torch.randn(shape, generator=generator)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1.0 + 0.3 * torch.randn(shape, generator=generator)
        elif "conv1d" in name:
            value = 0.4 * torch.randn(shape, generator=generator)
        elif name.endswith("word_embeddings.weight"):
            value = torch.randn(shape, generator=generator)
        elif param.dim() == 2:
            value = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        else:
            value = 0.3 * torch.randn(shape, generator=generator)
        param.copy_(value.to(param.dtype))


def make_model(variant: str, seed: int = 0, **overrides) -> MambaModel:
    torch.manual_seed(seed)
    model = MambaModel(make_config(variant, **overrides))
    perturb_(model, seed + 100)
    return model.eval()


def random_ids(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full_logits(model: MambaModel, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of the plain full-sequence forward (no cache): the oracle."""
    return model(torch.tensor([ids]))[0].float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


class CharTokenizer:
    """Token ``i`` is a short string (1 to 3 letters, so stop strings cross token boundaries)."""

    def __init__(self, vocab_size: int) -> None:
        self.pieces = [chr(ord("a") + i % 26) * (1 + i % 3) for i in range(vocab_size)]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


class ByteTokenizer:
    """Token ``i`` < 256 is the byte ``i``; text is decoded as UTF-8 with replacement (a multi-byte character split
    over tokens decodes to U+FFFD until complete), like byte-level BPE."""

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def hf_oracle():
    """tests/interop/hf_oracle.py (the team's transformers oracle), importable from any test folder."""
    if str(INTEROP_TESTS) not in sys.path:
        sys.path.insert(0, str(INTEROP_TESTS))
    import hf_oracle

    return hf_oracle
