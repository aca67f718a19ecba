"""The model configuration: one dataclass is the source of truth for every hyper-parameter of a hybrid model.

Field names follow Megatron-LM's command-line flags (``--hidden-size`` -> ``hidden_size``) so that the training CLI can
be derived from this class and a Megatron user recognises every knob.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

# Sizes that default to a function of other fields when left as None.
_DERIVED_FIELDS = ("num_query_groups", "kv_channels", "ffn_hidden_size", "mamba_num_heads")
ACTIVATIONS = ("squared_relu", "swiglu", "gelu")
POSITION_EMBEDDINGS = ("none", "rope")


@dataclass
class HybridConfig:
    """Hyper-parameters of a Mamba-2 / attention / MLP hybrid language model."""

    # Shape of the stack. The layer pattern comes from the ratios, or verbatim from hybrid_override_pattern.
    num_layers: int
    hidden_size: int
    vocab_size: int
    hybrid_attention_ratio: float = 0.0
    hybrid_mlp_ratio: float = 0.0
    hybrid_override_pattern: str | None = None

    # Attention (grouped-query when num_query_groups < num_attention_heads).
    num_attention_heads: int = 8
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: str = "none"
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    max_position_embeddings: int = 4096
    attention_dropout: float = 0.0

    # MLP.
    ffn_hidden_size: int | None = None
    activation: str = "squared_relu"
    add_bias_linear: bool = False

    # Mamba-2 mixer.
    mamba_state_dim: int = 128
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    mamba_num_heads: int | None = None
    mamba_expand: int = 2
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_conv_bias: bool = True
    mamba_A_init_range: tuple[float, float] = (1.0, 16.0)
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_dt_limit: tuple[float, float] = (0.0, math.inf)

    # Norms, residuals, embeddings.
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 1
    init_method_std: float = 0.02
    params_dtype: torch.dtype = field(default=torch.float32)

    # Parallelism that changes module behaviour (the group sizes themselves live in parallel.state).
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        # Remember which sizes were derived from others, so replace() re-derives them instead of freezing stale values.
        self._derived_fields = frozenset(name for name in _DERIVED_FIELDS if getattr(self, name) is None)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.mamba_num_heads is None:
            if self.mamba_d_inner_from_expand % self.mamba_head_dim:
                raise ValueError(
                    f"mamba_expand * hidden_size = {self.mamba_d_inner_from_expand} is not divisible by "
                    f"mamba_head_dim {self.mamba_head_dim}"
                )
            self.mamba_num_heads = self.mamba_d_inner_from_expand // self.mamba_head_dim
        self.mamba_A_init_range = tuple(self.mamba_A_init_range)
        self.mamba_dt_limit = tuple(self.mamba_dt_limit)
        self._validate()

    @property
    def mamba_d_inner_from_expand(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_d_inner(self) -> int:
        """Width of the Mamba mixer's inner stream (heads x head dim)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up so that every tensor-parallel rank holds an equal, aligned slice."""
        multiple = self.make_vocab_size_divisible_by
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def _validate(self) -> None:
        problems = []
        for name in (
            "num_layers",
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_query_groups",
            "mamba_state_dim",
            "mamba_head_dim",
            "mamba_num_groups",
            "mamba_num_heads",
            "mamba_conv_kernel",
            "mamba_chunk_size",
            "make_vocab_size_divisible_by",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        if self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                f"{self.num_query_groups}"
            )
        if self.mamba_num_heads % self.mamba_num_groups:
            problems.append(
                f"mamba_num_heads {self.mamba_num_heads} is not divisible by mamba_num_groups {self.mamba_num_groups}"
            )
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            problems.append(
                f"position_embedding_type must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding_type!r}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            problems.append(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        for name in ("hybrid_attention_ratio", "hybrid_mlp_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {value}")
        lo, hi = self.mamba_A_init_range
        if not 0 < lo <= hi:
            problems.append(f"mamba_A_init_range must satisfy 0 < low <= high, got {self.mamba_A_init_range}")
        if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
            problems.append(f"need 0 < mamba_dt_min <= mamba_dt_max, got {self.mamba_dt_min}, {self.mamba_dt_max}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def layer_pattern(self) -> str:
        """The stack's layer symbols (``M``, ``*``, ``-``), pipeline separators removed."""
        from megatron_hybrid.models.layer_pattern import allocate_layers

        pattern = allocate_layers(
            self.num_layers, self.hybrid_attention_ratio, self.hybrid_mlp_ratio, self.hybrid_override_pattern
        )
        return pattern.replace("|", "")

    def replace(self, **changes) -> HybridConfig:
        """A copy with ``changes``; sizes that were derived (e.g. ``kv_channels``) are derived again."""
        rederive = {name: None for name in self._derived_fields if name not in changes}
        return dataclasses.replace(self, **rederive, **changes)
