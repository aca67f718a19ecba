"""Smoke test: the installed package imports and its configuration dataclass builds and validates.

Kept deliberately cheap so that a broken install or a syntax error anywhere in the import path shows up as one clear
failure at the top of the suite.
"""

from __future__ import annotations

import pytest

import megatron_hybrid
from megatron_hybrid.config import HybridConfig


def _small(**overrides) -> HybridConfig:
    base = dict(
        num_layers=4,
        hidden_size=64,
        vocab_size=100,
        num_attention_heads=4,
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_state_dim=16,
    )
    base.update(overrides)
    return HybridConfig(**base)


def test_package_is_regular_and_reexports_config() -> None:
    assert megatron_hybrid.__file__ is not None, "megatron_hybrid/__init__.py is missing (namespace package)"
    assert megatron_hybrid.HybridConfig is HybridConfig


def test_config_derives_defaults() -> None:
    cfg = _small()
    assert cfg.kv_channels == 64 // 4
    assert cfg.num_query_groups == 4
    assert cfg.ffn_hidden_size == 4 * 64
    # d_inner = expand * hidden = 128, split into heads of 16.
    assert cfg.mamba_num_heads == 8
    assert cfg.mamba_d_inner == 128
    assert cfg.padded_vocab_size == 100


def test_padded_vocab_rounds_up() -> None:
    assert _small(make_vocab_size_divisible_by=128).padded_vocab_size == 128
    assert _small(vocab_size=256, make_vocab_size_divisible_by=128).padded_vocab_size == 256


def test_replace_returns_new_validated_config() -> None:
    cfg = _small()
    wider = cfg.replace(hidden_size=128)
    assert wider.hidden_size == 128 and cfg.hidden_size == 64
    # Sizes that were derived from hidden_size follow it; sizes given explicitly stay as given.
    assert wider.kv_channels == 128 // wider.num_attention_heads and wider.ffn_hidden_size == 4 * 128
    pinned = _small(kv_channels=8).replace(hidden_size=128)
    assert pinned.kv_channels == 8
    with pytest.raises(ValueError):
        cfg.replace(num_query_groups=3)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hidden_size=66),  # not divisible by 4 attention heads
        dict(num_query_groups=3),  # 4 heads not divisible by 3 groups
        dict(mamba_num_groups=3),  # 8 mamba heads not divisible by 3 groups
        dict(activation="tanh"),
        dict(num_layers=0),
    ],
)
def test_invalid_configs_are_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError):
        _small(**overrides)
