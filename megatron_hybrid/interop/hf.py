"""Conversion between Hugging Face ``transformers`` checkpoints and :class:`MambaModel`.

Two Hugging Face architectures describe models we can run:

* ``nemotron_h`` (``NemotronHForCausalLM``): a hybrid stack of Mamba-2 (``M``), attention (``*``) and squared-ReLU
  MLP (``-``) blocks. This is also the format we export to, so a model trained here loads in ``transformers``.
* ``mamba2`` (``Mamba2ForCausalLM``): a pure Mamba-2 stack (import only; it exports as an all-``M`` NemotronH).

Facts about transformers 5.25 that shape the conversion (checked against its modeling code):

* On disk NemotronH tensors are prefixed ``backbone.`` (transformers renames them to ``model.`` in memory); both
  prefixes are accepted on import, ``backbone.`` is written on export. Mamba2 uses ``backbone.`` (legacy
  ``backbone.embedding.weight`` is accepted too).
* NemotronH attention applies no rotary embedding and no bias, scales by ``head_dim ** -0.5``; q/k/v/o are separate
  matrices while ours is Megatron's fused ``linear_qkv`` (per query group: its q heads, then k, then v).
* Both mixers clamp ``softplus(dt + dt_bias)`` to ``time_step_limit``, which is our ``mamba_dt_limit``, as
  mamba_ssm's kernels always did; ``time_step_min`` / ``time_step_max`` only set the initialisation range. (Up to
  transformers 5.23 the NemotronH PyTorch path clamped to ``[time_step_min, inf)`` instead; checkpoints exported
  then wrote our lower limit into both fields and a lower limit of 0 as the smallest normal float32, which reads back
  as 0 here.)
* ``NemotronHForCausalLM`` never ties ``lm_head`` to the embeddings, whatever ``tie_word_embeddings`` says, so the
  export always writes ``lm_head.weight``, and an import only ties when ``lm_head.weight`` is absent or equal to the
  embedding matrix. ``Mamba2ForCausalLM`` does tie, and omits ``lm_head.weight`` from tied checkpoints.
* The in/out projections, the conv, ``dt_bias``/``A_log``/``D`` and the gated norm (``rmsnorm(y * silu(z))`` per
  group of ``d_inner / n_groups`` channels) have the same layout in both architectures and in ours, so those tensors
  copy over unchanged.

Only ``safetensors`` files in a local directory are read; nothing is fetched from the Hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_hybrid.config import HybridConfig

if TYPE_CHECKING:
    from transformers import Mamba2Config, NemotronHConfig, PreTrainedConfig

    from megatron_hybrid.models.mamba_model import MambaModel

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

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("nemotron_h", "mamba2")

# NemotronH's layer type names <-> our layer pattern symbols.
_NEMOTRON_BLOCK_TO_SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-"}
_SYMBOL_TO_NEMOTRON_BLOCK = {symbol: block for block, symbol in _NEMOTRON_BLOCK_TO_SYMBOL.items()}
# MLP activations with an exact counterpart: transformers' name -> ours (both "gelu"s are the exact erf form).
_HF_TO_OUR_ACTIVATION = {"relu2": "squared_relu", "gelu": "gelu"}
_OUR_TO_HF_ACTIVATION = {ours: hf for hf, ours in _HF_TO_OUR_ACTIVATION.items()}

_NO_CLAMP = torch.finfo(torch.float32).tiny  # what exports up to transformers 5.23 wrote for "no lower dt clamp"
_PREFIX = "backbone."  # the on-disk prefix of NemotronH and Mamba2 backbones
_IGNORED_HF_KEY = re.compile(r"^(mtp\.|model\.mtp\.|backbone\.mtp\.)")  # NemotronH multi-token-prediction heads


class HFInteropError(ValueError):
    """A Hugging Face checkpoint or config that cannot be converted (the message says which field or tensor)."""


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def _decode_special_floats(obj: Any) -> Any:
    """transformers 5 writes non-finite floats as ``{"__float__": "Infinity"}``; turn them back into floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {key: _decode_special_floats(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(value) for value in obj]
    return obj


def _hf_config_class(model_type: str | None) -> type:
    if model_type == "nemotron_h":
        from transformers import NemotronHConfig

        return NemotronHConfig
    if model_type == "mamba2":
        from transformers import Mamba2Config

        return Mamba2Config
    raise HFInteropError(
        f"unsupported model_type {model_type!r}; megatron_hybrid converts only {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _as_hf_config(hf_config: PreTrainedConfig | Mapping[str, Any]) -> PreTrainedConfig:
    if isinstance(hf_config, Mapping):
        config_dict = _decode_special_floats(dict(hf_config))
        return _hf_config_class(config_dict.get("model_type")).from_dict(config_dict)
    _hf_config_class(getattr(hf_config, "model_type", None))  # validates the type
    return hf_config


def load_hf_config(path: str | os.PathLike) -> PreTrainedConfig:
    """Read ``config.json`` of a local checkpoint directory into a NemotronHConfig or Mamba2Config."""
    directory = _checkpoint_directory(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise HFInteropError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config_dict, dict):
        raise HFInteropError(f"{config_file} does not hold a JSON object")
    if "model_type" not in config_dict:
        raise HFInteropError(f"{config_file} has no model_type; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _as_hf_config(config_dict)


def _reject(problems: list[str], model_type: str) -> None:
    if problems:
        raise HFInteropError(f"cannot convert this {model_type} model: " + "; ".join(problems))


def hybrid_config_from_hf(hf_config: PreTrainedConfig | Mapping[str, Any], **overrides: Any) -> HybridConfig:
    """Translate a NemotronH or Mamba2 config into a :class:`HybridConfig` describing the same network.

    ``overrides`` are HybridConfig fields that the Hugging Face config cannot know (``make_vocab_size_divisible_by``,
    ``params_dtype``, ``sequence_parallel``, ...). Features our model lacks raise :class:`HFInteropError` rather than
    being silently dropped, because the converted model would compute something else.
    ``untie_embeddings_and_output_weights`` follows ``tie_word_embeddings``; :func:`from_pretrained` unties it when the
    checkpoint's ``lm_head`` differs from the embeddings (NemotronH in transformers never ties).
    """
    config = _as_hf_config(hf_config)
    if config.model_type == "mamba2":
        fields = _fields_from_mamba2(config)
    else:
        fields = _fields_from_nemotron_h(config)
    fields.update(overrides)
    return HybridConfig(**fields)


def _common_mamba_checks(config: PreTrainedConfig, act_field: str, problems: list[str]) -> None:
    if getattr(config, act_field) != "silu":
        problems.append(f"{act_field}={getattr(config, act_field)!r} (our Mamba mixer uses silu)")
    if config.use_bias:
        problems.append("use_bias=True (Mamba in_proj/out_proj biases are not supported)")


def _dt_min_for_init(time_step_min: float, time_step_max: float) -> float:
    # mamba_dt_min only matters for initialising fresh weights; exports up to transformers 5.23 carried our dt lower
    # limit in time_step_min (by default "no clamp"), in which case the usual Mamba default stands in.
    if time_step_min > _NO_CLAMP:
        return min(time_step_min, time_step_max)
    return min(0.001, time_step_max)


def _fields_from_nemotron_h(config: NemotronHConfig) -> dict[str, Any]:
    problems: list[str] = []
    block_types = list(config.layers_block_type)
    unknown = sorted({block for block in block_types if block not in _NEMOTRON_BLOCK_TO_SYMBOL})
    if unknown:
        problems.append(
            f"layers_block_type contains {unknown} (MoE 'E' blocks are not supported; only "
            f"{sorted(_NEMOTRON_BLOCK_TO_SYMBOL)})"
        )
    _common_mamba_checks(config, "mamba_hidden_act", problems)
    if getattr(config, "mamba_proj_bias", False):
        problems.append("mamba_proj_bias=True (Mamba projection biases are not supported)")
    if config.attention_bias:
        problems.append("attention_bias=True (attention biases are not supported)")
    if config.mlp_bias:
        problems.append("mlp_bias=True (MLP biases are not supported)")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window} (only full causal attention is supported)")
    if "mlp" in block_types and config.mlp_hidden_act not in _HF_TO_OUR_ACTIVATION:
        problems.append(f"mlp_hidden_act={config.mlp_hidden_act!r} (supported: {sorted(_HF_TO_OUR_ACTIVATION)})")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(
            f"num_attention_heads {config.num_attention_heads} is not a multiple of num_key_value_heads "
            f"{config.num_key_value_heads}"
        )
    legacy_head_dim = getattr(config, "attention_head_dim", None)
    if "full_attention" in block_types and legacy_head_dim is not None and legacy_head_dim != config.head_dim:
        problems.append(
            f"attention_head_dim={legacy_head_dim} (a legacy field transformers ignores) differs from head_dim="
            f"{config.head_dim}; set head_dim in config.json"
        )
    _reject(problems, "nemotron_h")

    pattern = "".join(_NEMOTRON_BLOCK_TO_SYMBOL[block] for block in block_types)
    activation = _HF_TO_OUR_ACTIVATION.get(config.mlp_hidden_act, "squared_relu")
    return {
        "num_layers": len(pattern),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "hybrid_override_pattern": pattern,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_key_value_heads,
        "kv_channels": config.head_dim,
        "position_embedding_type": "none",
        "max_position_embeddings": config.max_position_embeddings,
        "attention_dropout": float(config.attention_dropout),
        "ffn_hidden_size": config.intermediate_size,
        "activation": activation,
        "add_bias_linear": False,
        "mamba_state_dim": config.ssm_state_size,
        "mamba_head_dim": config.mamba_head_dim,
        "mamba_num_groups": config.n_groups,
        "mamba_num_heads": config.mamba_num_heads,
        "mamba_expand": config.expand,
        "mamba_conv_kernel": config.conv_kernel,
        "mamba_chunk_size": config.chunk_size,
        "mamba_conv_bias": config.use_conv_bias,
        "mamba_dt_min": _dt_min_for_init(config.time_step_min, config.time_step_max),
        "mamba_dt_max": config.time_step_max,
        "mamba_dt_init_floor": config.time_step_floor,
        "mamba_dt_limit": _dt_limit(config.time_step_limit),
        "norm_epsilon": config.layer_norm_epsilon,
        "residual_in_fp32": bool(config.residual_in_fp32),
        "hidden_dropout": float(config.hidden_dropout),
        "untie_embeddings_and_output_weights": not config.tie_word_embeddings,
        "init_method_std": config.initializer_range,
    }


def _fields_from_mamba2(config: Mamba2Config) -> dict[str, Any]:
    problems: list[str] = []
    _common_mamba_checks(config, "hidden_act", problems)
    d_inner = int(config.expand * config.hidden_size)
    if config.num_heads * config.head_dim != d_inner:
        problems.append(
            f"num_heads * head_dim = {config.num_heads * config.head_dim} differs from expand * hidden_size = "
            f"{d_inner}"
        )
    _reject(problems, "mamba2")
    low, high = _dt_limit(config.time_step_limit)
    return {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "hybrid_override_pattern": "M" * config.num_hidden_layers,
        # No attention layers: one head spanning the hidden size keeps HybridConfig's derived fields valid.
        "num_attention_heads": 1,
        "num_query_groups": 1,
        "mamba_state_dim": config.state_size,
        "mamba_head_dim": config.head_dim,
        "mamba_num_groups": config.n_groups,
        "mamba_num_heads": config.num_heads,
        "mamba_expand": int(config.expand),
        "mamba_conv_kernel": config.conv_kernel,
        "mamba_chunk_size": config.chunk_size,
        "mamba_conv_bias": config.use_conv_bias,
        "mamba_dt_min": _dt_min_for_init(config.time_step_min, config.time_step_max),
        "mamba_dt_max": config.time_step_max,
        "mamba_dt_init_floor": config.time_step_floor,
        "mamba_dt_limit": (low, high),
        "norm_epsilon": config.layer_norm_epsilon,
        "residual_in_fp32": bool(config.residual_in_fp32),
        "untie_embeddings_and_output_weights": not config.tie_word_embeddings,
        "init_method_std": config.initializer_range,
    }


def _layer_symbols(config: HybridConfig) -> str:
    pattern = config.layer_pattern
    unknown = sorted(set(pattern) - set(_SYMBOL_TO_NEMOTRON_BLOCK))
    if unknown:
        raise HFInteropError(f"layer pattern {pattern!r} contains symbols {unknown} that have no NemotronH block")
    if len(pattern) != config.num_layers:
        raise HFInteropError(f"layer pattern {pattern!r} has {len(pattern)} layers, config says {config.num_layers}")
    return pattern


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dt_limit(time_step_limit) -> tuple[float, float]:
    low, high = (float(v) for v in time_step_limit)
    return (low if low > _NO_CLAMP else 0.0), high


def hf_config_from_hybrid(config: HybridConfig, **overrides: Any) -> NemotronHConfig:
    """The NemotronHConfig under which ``NemotronHForCausalLM`` computes what our model computes.

    ``overrides`` are passed to NemotronHConfig (e.g. ``bos_token_id``/``eos_token_id``/``pad_token_id``, which depend
    on the tokenizer). Raises :class:`HFInteropError` for features NemotronH cannot express.
    """
    from transformers import NemotronHConfig

    pattern = _layer_symbols(config)
    problems: list[str] = []
    if "-" in pattern and config.activation not in _OUR_TO_HF_ACTIVATION:
        problems.append(
            f"activation={config.activation!r} has no NemotronH equivalent (NemotronH MLPs are ungated; supported: "
            f"{sorted(_OUR_TO_HF_ACTIVATION)})"
        )
    if "*" in pattern and config.position_embedding_type != "none":
        problems.append(
            f"position_embedding_type={config.position_embedding_type!r} (NemotronH attention has no positional "
            "embedding)"
        )
    if config.add_bias_linear:
        problems.append("add_bias_linear=True (NemotronH linears have no bias)")
    dt_low, dt_high = config.mamba_dt_limit
    _reject(problems, "megatron_hybrid")

    fields: dict[str, Any] = {
        "architectures": ["NemotronHForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "layers_block_type": [_SYMBOL_TO_NEMOTRON_BLOCK[symbol] for symbol in pattern],
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.kv_channels,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": config.attention_dropout,
        "intermediate_size": config.ffn_hidden_size,
        "mlp_hidden_act": _OUR_TO_HF_ACTIVATION.get(config.activation, "relu2"),
        "mlp_bias": False,
        "ssm_state_size": config.mamba_state_dim,
        "mamba_num_heads": config.mamba_num_heads,
        "mamba_head_dim": config.mamba_head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": config.mamba_num_groups,
        "conv_kernel": config.mamba_conv_kernel,
        "expand": config.mamba_expand,
        "time_step_min": config.mamba_dt_min,
        "time_step_max": config.mamba_dt_max,
        "time_step_limit": (float(dt_low), float(dt_high)),
        "time_step_floor": config.mamba_dt_init_floor,
        "use_conv_bias": config.mamba_conv_bias,
        "chunk_size": config.mamba_chunk_size,
        "mamba_proj_bias": False,
        "use_bias": False,
        "num_nextn_predict_layers": 0,
        "initializer_range": config.init_method_std,
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        "hidden_dropout": config.hidden_dropout,
        "dtype": _dtype_name(config.params_dtype),
    }
    fields.update(overrides)
    return NemotronHConfig(**fields)


# ----------------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------------


def _expected_hf_shapes(config: HybridConfig, include_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor (on-disk ``backbone.`` names) of the NemotronH/Mamba2 checkpoint of ``config``, with its shape."""
    hidden = config.hidden_size
    d_inner = config.mamba_d_inner
    group_width = config.mamba_num_groups * config.mamba_state_dim
    nheads = config.mamba_num_heads
    conv_dim = d_inner + 2 * group_width
    head_dim = config.kv_channels
    shapes: dict[str, tuple[int, ...]] = {f"{_PREFIX}embeddings.weight": (config.vocab_size, hidden)}
    for i, symbol in enumerate(_layer_symbols(config)):
        layer = f"{_PREFIX}layers.{i}."
        shapes[layer + "norm.weight"] = (hidden,)
        if symbol == "M":
            shapes[layer + "mixer.in_proj.weight"] = (2 * d_inner + 2 * group_width + nheads, hidden)
            shapes[layer + "mixer.conv1d.weight"] = (conv_dim, 1, config.mamba_conv_kernel)
            if config.mamba_conv_bias:
                shapes[layer + "mixer.conv1d.bias"] = (conv_dim,)
            for name in ("dt_bias", "A_log", "D"):
                shapes[layer + "mixer." + name] = (nheads,)
            shapes[layer + "mixer.norm.weight"] = (d_inner,)
            shapes[layer + "mixer.out_proj.weight"] = (hidden, d_inner)
        elif symbol == "*":
            shapes[layer + "mixer.q_proj.weight"] = (config.num_attention_heads * head_dim, hidden)
            shapes[layer + "mixer.k_proj.weight"] = (config.num_query_groups * head_dim, hidden)
            shapes[layer + "mixer.v_proj.weight"] = (config.num_query_groups * head_dim, hidden)
            shapes[layer + "mixer.o_proj.weight"] = (hidden, config.num_attention_heads * head_dim)
        else:
            shapes[layer + "mixer.up_proj.weight"] = (config.ffn_hidden_size, hidden)
            shapes[layer + "mixer.down_proj.weight"] = (hidden, config.ffn_hidden_size)
    shapes[f"{_PREFIX}norm_f.weight"] = (hidden,)
    if include_lm_head:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _normalise_hf_keys(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map in-memory (``model.``) and legacy names onto the on-disk ``backbone.`` names; drop MTP heads."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_sd.items():
        if _IGNORED_HF_KEY.match(key):
            continue
        name = key
        if name.startswith("model."):
            name = _PREFIX + name[len("model."):]
        if name == f"{_PREFIX}embedding.weight":  # early Mamba2 conversions
            name = f"{_PREFIX}embeddings.weight"
        if name in out:
            raise HFInteropError(f"tensor {name!r} appears twice in the checkpoint (as {key!r} and another name)")
        out[name] = tensor
    return out


def _check_tensors(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                   optional: set[str], what: str) -> None:
    missing = [name for name in expected if name not in found and name not in optional]
    unexpected = [name for name in found if name not in expected]
    wrong_shape = [
        f"{name}: expected {list(shape)}, got {list(found[name].shape)}"
        for name, shape in expected.items() if name in found and tuple(found[name].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {_listing(wrong_shape)}")
    if problems:
        raise HFInteropError(f"{what} does not match the model config: " + "; ".join(problems))


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


def _pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if weight.shape[0] == padded_vocab:
        return weight
    padding = weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding], dim=0)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: HybridConfig) -> torch.Tensor:
    """Separate q/k/v -> Megatron's fused rows: for each query group g, its q heads, then k_g, then v_g."""
    groups, head_dim, hidden = config.num_query_groups, config.kv_channels, q.shape[-1]
    heads_per_group = config.num_attention_heads // groups
    fused = torch.cat([
        q.reshape(groups, heads_per_group, head_dim, hidden),
        k.reshape(groups, 1, head_dim, hidden),
        v.reshape(groups, 1, head_dim, hidden),
    ], dim=1)
    return fused.reshape(-1, hidden)


def _split_qkv(qkv: torch.Tensor, config: HybridConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, head_dim, hidden = config.num_query_groups, config.kv_channels, qkv.shape[-1]
    heads_per_group = config.num_attention_heads // groups
    q, k, v = qkv.reshape(groups, heads_per_group + 2, head_dim, hidden).split([heads_per_group, 1, 1], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


# Per-layer tensor names: (HF name under "mixer." or the block norm, our name under the layer), by layer symbol.
_MAMBA_NAMES = [(f"mixer.{name}", f"mixer.{name}") for name in (
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")]
_NORM_NAME = {"M": "norm.weight", "*": "input_layernorm.weight", "-": "pre_mlp_layernorm.weight"}
_MLP_NAMES = [("mixer.up_proj.weight", "mlp.linear_fc1.weight"), ("mixer.down_proj.weight", "mlp.linear_fc2.weight")]


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A NemotronH/Mamba2 state dict -> the TP=1 state dict of ``MambaModel(config)``.

    Accepts on-disk (``backbone.``) and in-memory (``model.``) names. Embedding and output rows beyond ``vocab_size``
    (our vocab padding) are zero-filled. With tied embeddings ``lm_head.weight`` may be absent; if present it must
    equal the embeddings (otherwise the config must be untied). Raises :class:`HFInteropError` naming every missing,
    unexpected or mis-shaped tensor.
    """
    tied = not config.untie_embeddings_and_output_weights
    sd = _normalise_hf_keys(hf_sd)
    expected = _expected_hf_shapes(config, include_lm_head=True)
    _check_tensors(sd, expected, optional={"lm_head.weight"} if tied else set(), what="Hugging Face checkpoint")

    padded_vocab = config.padded_vocab_size
    embeddings = sd[f"{_PREFIX}embeddings.weight"]
    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": _pad_vocab(embeddings, padded_vocab)}
    for i, symbol in enumerate(_layer_symbols(config)):
        hf_layer, our_layer = f"{_PREFIX}layers.{i}.", f"decoder.layers.{i}."
        out[our_layer + _NORM_NAME[symbol]] = sd[hf_layer + "norm.weight"]
        if symbol == "M":
            for hf_name, our_name in _MAMBA_NAMES:
                if hf_layer + hf_name in sd:
                    out[our_layer + our_name] = sd[hf_layer + hf_name]
        elif symbol == "*":
            q, k, v = (sd[hf_layer + f"mixer.{p}_proj.weight"] for p in "qkv")
            out[our_layer + "self_attention.linear_qkv.weight"] = _fuse_qkv(q, k, v, config)
            out[our_layer + "self_attention.linear_proj.weight"] = sd[hf_layer + "mixer.o_proj.weight"]
        else:
            for hf_name, our_name in _MLP_NAMES:
                out[our_layer + our_name] = sd[hf_layer + hf_name]
    out["decoder.final_norm.weight"] = sd[f"{_PREFIX}norm_f.weight"]
    lm_head = sd.get("lm_head.weight")
    if tied:
        if lm_head is not None and not torch.equal(lm_head, embeddings):
            raise HFInteropError(
                "the config ties embeddings and output weights but lm_head.weight differs from the embeddings; "
                "convert with untie_embeddings_and_output_weights=True"
            )
    else:
        out["output_layer.weight"] = _pad_vocab(lm_head, padded_vocab)
    return out


def _expected_our_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hf_shapes = _expected_hf_shapes(config, include_lm_head=False)
    padded = config.padded_vocab_size
    shapes["embedding.word_embeddings.weight"] = (padded, config.hidden_size)
    head_dim = config.kv_channels
    for i, symbol in enumerate(_layer_symbols(config)):
        hf_layer, our_layer = f"{_PREFIX}layers.{i}.", f"decoder.layers.{i}."
        shapes[our_layer + _NORM_NAME[symbol]] = (config.hidden_size,)
        if symbol == "M":
            for hf_name, our_name in _MAMBA_NAMES:
                if hf_layer + hf_name in hf_shapes:
                    shapes[our_layer + our_name] = hf_shapes[hf_layer + hf_name]
        elif symbol == "*":
            qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * head_dim
            shapes[our_layer + "self_attention.linear_qkv.weight"] = (qkv_rows, config.hidden_size)
            shapes[our_layer + "self_attention.linear_proj.weight"] = hf_shapes[hf_layer + "mixer.o_proj.weight"]
        else:
            for hf_name, our_name in _MLP_NAMES:
                shapes[our_layer + our_name] = hf_shapes[hf_layer + hf_name]
    shapes["decoder.final_norm.weight"] = (config.hidden_size,)
    shapes["output_layer.weight"] = (padded, config.hidden_size)
    return shapes


def state_dict_to_hf(our_sd: Mapping[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """The TP=1 state dict of ``MambaModel(config)`` -> a NemotronH state dict with on-disk (``backbone.``) names.

    Vocab padding rows are dropped. ``lm_head.weight`` is always written (a copy of the embeddings when tied), because
    ``NemotronHForCausalLM`` does not tie weights. Tensors are returned as fresh contiguous tensors (safe to save).
    """
    tied = not config.untie_embeddings_and_output_weights
    sd = {key: value for key, value in our_sd.items() if not key.endswith("._extra_state")}
    expected = _expected_our_shapes(config)
    _check_tensors(sd, expected, optional={"output_layer.weight"} if tied else set(), what="MambaModel state dict")

    vocab = config.vocab_size
    embeddings = sd["embedding.word_embeddings.weight"]
    out: dict[str, torch.Tensor] = {f"{_PREFIX}embeddings.weight": embeddings[:vocab]}
    for i, symbol in enumerate(_layer_symbols(config)):
        hf_layer, our_layer = f"{_PREFIX}layers.{i}.", f"decoder.layers.{i}."
        out[hf_layer + "norm.weight"] = sd[our_layer + _NORM_NAME[symbol]]
        if symbol == "M":
            for hf_name, our_name in _MAMBA_NAMES:
                if our_layer + our_name in sd:
                    out[hf_layer + hf_name] = sd[our_layer + our_name]
        elif symbol == "*":
            q, k, v = _split_qkv(sd[our_layer + "self_attention.linear_qkv.weight"], config)
            out[hf_layer + "mixer.q_proj.weight"] = q
            out[hf_layer + "mixer.k_proj.weight"] = k
            out[hf_layer + "mixer.v_proj.weight"] = v
            out[hf_layer + "mixer.o_proj.weight"] = sd[our_layer + "self_attention.linear_proj.weight"]
        else:
            for hf_name, our_name in _MLP_NAMES:
                out[hf_layer + hf_name] = sd[our_layer + our_name]
    out[f"{_PREFIX}norm_f.weight"] = sd["decoder.final_norm.weight"]
    output = sd.get("output_layer.weight")
    if tied:
        if output is not None and not torch.equal(output, embeddings):
            raise HFInteropError("embeddings are tied but output_layer.weight differs from the embeddings")
        output = embeddings
    out["lm_head.weight"] = output[:vocab]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def _checkpoint_directory(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist (only local directories are read)")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory; pass the checkpoint directory")
    return directory


def _weight_files(directory: Path) -> list[Path]:
    index_file = directory / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise HFInteropError(f"{index_file} is not a valid safetensors index: {error!r}") from error
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_file} names shard files that are missing in {directory}: {missing}")
        return [directory / name for name in files]
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}{hint}")


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a local safetensors checkpoint: one file, or the shards named by the index file."""
    from safetensors import safe_open

    state_dict: dict[str, torch.Tensor] = {}
    for file in _weight_files(_checkpoint_directory(path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in state_dict:
                    raise HFInteropError(f"tensor {key!r} is stored in more than one shard ({file.name} and another)")
                state_dict[key] = handle.get_tensor(key)
    return state_dict


def _resolve_dtype(dtype: torch.dtype | str | None, hf_config: PreTrainedConfig,
                   hf_sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if dtype is None:
            floating = [t.dtype for t in hf_sd.values() if t.is_floating_point()]
            dtype = floating[0] if floating else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise HFInteropError(f"unknown dtype {dtype!r}")
        dtype = resolved
    if not dtype.is_floating_point:
        raise HFInteropError(f"dtype must be a floating point type, got {dtype}")
    return dtype


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    **config_overrides: Any) -> MambaModel:
    """Build a :class:`MambaModel` from a local NemotronH or Mamba2 Hugging Face checkpoint directory.

    ``dtype`` None (or "auto") keeps the checkpoint's dtype (``config.json``'s ``dtype``, else the tensors'); every
    tensor is cast to it. ``config_overrides`` are HybridConfig fields to set on top of the converted config (e.g.
    ``make_vocab_size_divisible_by=128``). The model is returned in eval mode on the CPU.
    """
    from megatron_hybrid.models.mamba_model import MambaModel

    hf_config = load_hf_config(path)
    hf_sd = load_hf_state_dict(path)
    params_dtype = _resolve_dtype(dtype, hf_config, hf_sd)
    overrides = {"params_dtype": params_dtype, **config_overrides}
    config = hybrid_config_from_hf(hf_config, **overrides)
    if not config.untie_embeddings_and_output_weights and "untie_embeddings_and_output_weights" not in overrides:
        names = _normalise_hf_keys(hf_sd)
        lm_head, embeddings = names.get("lm_head.weight"), names.get(f"{_PREFIX}embeddings.weight")
        if lm_head is not None and (embeddings is None or lm_head.shape != embeddings.shape
                                    or not torch.equal(lm_head, embeddings)):
            # NemotronHForCausalLM (transformers 5.x) keeps lm_head separate even when tie_word_embeddings=True.
            config = config.replace(untie_embeddings_and_output_weights=True)
    state_dict = state_dict_from_hf(hf_sd, config)
    state_dict = {name: tensor.to(params_dtype) for name, tensor in state_dict.items()}
    model = _empty_model(MambaModel, config, params_dtype)
    _load_into(model, state_dict)
    return model.eval()


def _meta_tensors(model: torch.nn.Module, loaded: set[str]) -> list[str]:
    """Names of tensors that loading ``loaded`` would not fill: non-persistent buffers and plain tensor attributes."""
    state_names = set(model.state_dict())
    names = [name for name, _ in model.named_buffers() if name not in state_names or name not in loaded]
    for module_name, module in model.named_modules():
        names += [f"{module_name}.{key}" for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
    return names


def _empty_model(model_class: type, config: HybridConfig, params_dtype: torch.dtype) -> torch.nn.Module:
    """Allocate the model without running its random initialisation, which the checkpoint overwrites anyway.

    Built on the meta device and then given uninitialised CPU storage. ``to_empty`` replaces meta Parameters by new
    ones, so the attributes the layers attach to them (``tp_dim``, ``tp_components``, ``no_weight_decay``,
    ``sequence_parallel``, ...) are copied over. Falls back to a normal construction when the model holds tensors the
    state dict does not restore. The final cast makes every tensor ``params_dtype`` even if a layer allocates another
    dtype.
    """
    with torch.device("meta"):
        model = model_class(config)
    if _meta_tensors(model, set(model.state_dict())):
        return model_class(config).to(params_dtype)
    attributes = {name: dict(vars(param)) for name, param in model.named_parameters(remove_duplicate=False)}
    model = model.to_empty(device="cpu")
    for name, param in model.named_parameters(remove_duplicate=False):
        for key, value in attributes[name].items():
            if not hasattr(param, key):
                setattr(param, key, value)
    return model.to(params_dtype)


def _load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    problems = [
        f"{name}: checkpoint {list(tensor.shape)} vs model {list(own[name].shape)}"
        for name, tensor in state_dict.items() if name in own and own[name].shape != tensor.shape
    ]
    if problems:
        raise HFInteropError(f"converted tensors do not fit MambaModel: {_listing(problems)}")
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise HFInteropError(
            f"converted state dict does not fit MambaModel: missing {_listing(missing)}, "
            f"unexpected {_listing(list(result.unexpected_keys))}"
        )


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if match is None:
            raise ValueError(f"cannot parse max_shard_size {size!r} (use an int of bytes or e.g. '5GB', '500MiB')")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shard(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    current = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > max_bytes:
            shards.append({})
            current = 0
        shards[-1][name] = tensor
        current += size
    return shards


def _model_config(model: torch.nn.Module) -> HybridConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, HybridConfig):
        raise TypeError(f"expected a MambaModel with a HybridConfig .config, got {type(model).__name__}")
    groups = getattr(model, "groups", None)
    if groups is not None and getattr(groups, "tp_size", 1) > 1:
        raise HFInteropError(
            "save_pretrained needs the full (TP=1) model; gather a tensor-parallel model's state dict first "
            "(megatron_hybrid.parallel.sharding.gather_full_state_dict) and save it from one rank"
        )
    for flag in ("pre_process", "post_process"):
        if getattr(model, flag, True) is False:
            raise HFInteropError(f"save_pretrained needs the whole model, this one has {flag}=False")
    return config


def save_pretrained(model: MambaModel, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, **hf_config_overrides: Any) -> None:
    """Write ``model`` as a NemotronH checkpoint that ``NemotronHForCausalLM.from_pretrained(path)`` loads.

    Writes ``config.json`` and either ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size`` (bytes, or a string like "5GB").
    Everything is first written to a temporary directory next to ``path`` and then moved into place, so a crash never
    leaves a half-written checkpoint; when ``path`` already exists other files in it (e.g. a tokenizer) are kept and
    stale weight files of an earlier save are removed. ``dtype`` optionally casts the saved tensors.
    ``hf_config_overrides`` go to :func:`hf_config_from_hybrid` (token ids, ...).
    """
    from safetensors.torch import save_file

    config = _model_config(model)
    max_bytes = _parse_size(max_shard_size)
    state_dict = state_dict_to_hf(model.state_dict(), config)
    state_dict = {name: tensor.to(device="cpu", dtype=dtype) for name, tensor in state_dict.items()}
    # config.json's dtype is what the files hold (the model may have been cast after construction).
    hf_config_overrides.setdefault("dtype", _dtype_name(state_dict[f"{_PREFIX}embeddings.weight"].dtype))
    hf_config = hf_config_from_hybrid(config, **hf_config_overrides)

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        shards = _shard(state_dict, max_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(staging / SAFE_WEIGHTS_NAME), metadata=metadata)
        else:
            weight_map: dict[str, str] = {}
            for number, shard in enumerate(shards, start=1):
                file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / file_name), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, file_name))
            total = sum(t.numel() * t.element_size() for t in state_dict.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf_config.save_pretrained(str(staging))
        _move_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _is_weight_file(name: str) -> bool:
    return name == SAFE_WEIGHTS_INDEX_NAME or bool(re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name))


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(staging, target)
            return
        except OSError:
            target.mkdir(parents=True, exist_ok=True)  # lost a race with another writer: fall back to per file
    new_files = {p.name for p in staging.iterdir()}
    # Weights first, config.json last: a reader that sees the new config also sees the new weights.
    for name in sorted(new_files, key=lambda n: n == CONFIG_NAME):
        os.replace(staging / name, target / name)
    for stale in target.iterdir():
        if stale.is_file() and _is_weight_file(stale.name) and stale.name not in new_files:
            stale.unlink()
