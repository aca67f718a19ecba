"""Config and state-dict conversion between transformers (NemotronH, Mamba2) and megatron_hybrid, without a forward.

These pin the layout facts the parity tests rely on: the fused-QKV interleave, vocab padding, tying, the dt clamp
mapping, and that HF -> ours -> HF is bit-identical.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hf_oracle import build_hf_model, tiny_mamba2_config, tiny_nemotron_h_config

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.interop.hf import (
    HFInteropError,
    hf_config_from_hybrid,
    hybrid_config_from_hf,
    load_hf_config,
    load_hf_state_dict,
    state_dict_from_hf,
    state_dict_to_hf,
)

transformers = pytest.importorskip("transformers")


def _disk_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF model's state dict under its on-disk names (what save_pretrained writes)."""
    out = {}
    for key, value in model.state_dict().items():
        out["backbone." + key[len("model."):] if key.startswith("model.") else key] = value
    return out


def test_nemotron_h_config_fields() -> None:
    hf = tiny_nemotron_h_config(time_step_min=0.002, time_step_limit=(0.0005, 3.0), residual_in_fp32=True)
    config = hybrid_config_from_hf(hf)
    assert config.layer_pattern == "M*-M*-"
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (6, 32, 61)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 8)
    assert config.position_embedding_type == "none"
    assert (config.ffn_hidden_size, config.activation) == (48, "squared_relu")
    assert (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups) == (8, 8, 2)
    assert (config.mamba_state_dim, config.mamba_conv_kernel, config.mamba_chunk_size) == (8, 4, 8)
    # NemotronHMamba2Mixer clamps dt to time_step_limit (transformers >= 5.25); time_step_min is the init range.
    assert config.mamba_dt_limit == (0.0005, 3.0)
    assert config.mamba_dt_min == 0.002
    assert config.residual_in_fp32 is True
    assert config.untie_embeddings_and_output_weights is True
    assert config.norm_epsilon == hf.layer_norm_epsilon


def test_nemotron_h_config_from_json_dict_with_legacy_fields() -> None:
    # Older NemotronH configs spell the pattern and several Mamba fields differently; transformers maps them.
    config = hybrid_config_from_hf({
        "model_type": "nemotron_h", "vocab_size": 17, "hidden_size": 16, "hybrid_override_pattern": "M-*",
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24,
        "mamba_num_heads": 4, "mamba_head_dim": 8, "mamba_n_groups": 2, "ssm_state_size": 4, "mamba_d_conv": 3,
        "time_step_limit": [0.0, {"__float__": "Infinity"}],
    })
    assert config.layer_pattern == "M-*"
    assert (config.mamba_num_groups, config.mamba_conv_kernel) == (2, 3)


def test_hf_config_round_trip() -> None:
    hf = tiny_nemotron_h_config(tie_word_embeddings=True, time_step_min=0.003)
    config = hybrid_config_from_hf(hf)
    back = hf_config_from_hybrid(config)
    assert back.model_type == "nemotron_h" and back.architectures == ["NemotronHForCausalLM"]
    for field in ("vocab_size", "hidden_size", "layers_block_type", "tie_word_embeddings", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "intermediate_size", "mlp_hidden_act", "ssm_state_size",
                  "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel", "chunk_size", "use_conv_bias",
                  "time_step_min", "layer_norm_epsilon", "residual_in_fp32"):
        assert getattr(back, field) == getattr(hf, field), field


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.001, 10.0)])
def test_export_config_carries_dt_limit_in_time_step_limit(dt_limit) -> None:
    config = HybridConfig(num_layers=2, hidden_size=32, vocab_size=10, hybrid_override_pattern="M-",
                          mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_dt_min=0.01,
                          mamba_dt_limit=dt_limit)
    hf = hf_config_from_hybrid(config)
    assert tuple(hf.time_step_limit) == dt_limit  # the clamp NemotronH applies
    assert hf.time_step_min == 0.01  # the initialisation range only
    transformers.NemotronHForCausalLM(hf)  # constructible
    assert hf.mlp_hidden_act == "relu2"
    assert hybrid_config_from_hf(hf).mamba_dt_limit == dt_limit


def test_exports_of_transformers_5_23_read_back_with_their_clamp() -> None:
    """Up to transformers 5.23 NemotronH clamped to [time_step_min, inf) on CPU; our exports then wrote the lower limit
    into both fields, 0 as the tiniest normal float32. Those files keep their meaning."""
    tiny = torch.finfo(torch.float32).tiny
    hf = tiny_nemotron_h_config(time_step_min=tiny, time_step_limit=(tiny, math.inf))
    config = hybrid_config_from_hf(hf)
    assert config.mamba_dt_limit == (0.0, math.inf)
    assert config.mamba_dt_min == 0.001  # "no clamp" is not an init range: the usual Mamba default


def test_mamba2_config_fields() -> None:
    hf = tiny_mamba2_config(time_step_limit=(0.0005, 2.0), tie_word_embeddings=True)
    config = hybrid_config_from_hf(hf)
    assert config.layer_pattern == "MMM"
    assert config.mamba_dt_limit == (0.0005, 2.0)  # Mamba2 does use time_step_limit
    assert config.untie_embeddings_and_output_weights is False
    assert config.mamba_d_inner == 64


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("divisible_by", [1, 64])
def test_nemotron_h_state_dict_round_trip_is_bit_identical(tie: bool, divisible_by: int) -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config(tie_word_embeddings=tie))
    hf_sd = _disk_state_dict(hf_model)
    if tie:  # what a tied checkpoint means for us: lm_head equal to the embeddings
        hf_sd["lm_head.weight"] = hf_sd["backbone.embeddings.weight"].clone()
    config = hybrid_config_from_hf(hf_model.config, make_vocab_size_divisible_by=divisible_by)
    ours = state_dict_from_hf(hf_sd, config)

    padded = config.padded_vocab_size
    assert ours["embedding.word_embeddings.weight"].shape == (padded, 32)
    assert torch.all(ours["embedding.word_embeddings.weight"][61:] == 0)
    assert ("output_layer.weight" in ours) is not tie
    back = state_dict_to_hf(ours, config)
    assert back.keys() == hf_sd.keys()
    for name, tensor in hf_sd.items():
        assert torch.equal(back[name], tensor), name


def test_in_memory_model_prefix_is_accepted() -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    config = hybrid_config_from_hf(hf_model.config)
    from_memory = state_dict_from_hf(hf_model.state_dict(), config)
    from_disk = state_dict_from_hf(_disk_state_dict(hf_model), config)
    assert from_memory.keys() == from_disk.keys()
    assert all(torch.equal(from_memory[k], from_disk[k]) for k in from_disk)


def test_fused_qkv_layout_is_megatron_per_group_interleave() -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    config = hybrid_config_from_hf(hf_model.config)
    ours = state_dict_from_hf(hf_model.state_dict(), config)
    attention = hf_model.model.layers[1].mixer
    qkv = ours["decoder.layers.1.self_attention.linear_qkv.weight"]
    d, heads_per_group = 8, 2
    rows = qkv.reshape(2, heads_per_group + 2, d, 32)  # [group, (q heads of the group, k, v), head_dim, hidden]
    for g in range(2):
        for j in range(heads_per_group):
            head = g * heads_per_group + j
            assert torch.equal(rows[g, j], attention.q_proj.weight[head * d:(head + 1) * d])
        assert torch.equal(rows[g, heads_per_group], attention.k_proj.weight[g * d:(g + 1) * d])
        assert torch.equal(rows[g, heads_per_group + 1], attention.v_proj.weight[g * d:(g + 1) * d])


def test_mixer_and_mlp_tensors_copy_unchanged() -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    config = hybrid_config_from_hf(hf_model.config)
    ours = state_dict_from_hf(hf_model.state_dict(), config)
    mixer = hf_model.model.layers[0].mixer
    for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight"):
        assert torch.equal(ours[f"decoder.layers.0.mixer.{name}"], mixer.get_parameter(name)), name
    assert torch.equal(ours["decoder.layers.0.norm.weight"], hf_model.model.layers[0].norm.weight)
    assert torch.equal(ours["decoder.layers.1.input_layernorm.weight"], hf_model.model.layers[1].norm.weight)
    assert torch.equal(ours["decoder.layers.2.pre_mlp_layernorm.weight"], hf_model.model.layers[2].norm.weight)
    assert torch.equal(ours["decoder.layers.2.mlp.linear_fc1.weight"], hf_model.model.layers[2].mixer.up_proj.weight)
    assert torch.equal(ours["decoder.final_norm.weight"], hf_model.model.norm_f.weight)


@pytest.mark.parametrize("tie", [False, True])
def test_mamba2_state_dict(tie: bool) -> None:
    hf_model = build_hf_model(tiny_mamba2_config(tie_word_embeddings=tie))
    hf_sd = hf_model.state_dict()
    if tie:
        del hf_sd["lm_head.weight"]  # tied Mamba2 checkpoints omit it
    config = hybrid_config_from_hf(hf_model.config)
    ours = state_dict_from_hf(hf_sd, config)
    assert ("output_layer.weight" in ours) is not tie
    assert torch.equal(ours["decoder.layers.2.mixer.D"], hf_model.backbone.layers[2].mixer.D)
    legacy = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf_sd.items()}
    assert torch.equal(state_dict_from_hf(legacy, config)["embedding.word_embeddings.weight"],
                       ours["embedding.word_embeddings.weight"])


def test_export_always_writes_lm_head_and_drops_padding() -> None:
    config = HybridConfig(num_layers=1, hidden_size=16, vocab_size=10, hybrid_override_pattern="-",
                          ffn_hidden_size=24, num_attention_heads=2, mamba_head_dim=8,
                          mamba_num_groups=2, make_vocab_size_divisible_by=8)
    embeddings = torch.randn(16, 16)
    ours = {"embedding.word_embeddings.weight": embeddings, "decoder.layers.0.pre_mlp_layernorm.weight": torch.ones(16),
            "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(24, 16),
            "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(16, 24), "decoder.final_norm.weight": torch.ones(16)}
    hf = state_dict_to_hf(ours, config)
    assert torch.equal(hf["lm_head.weight"], embeddings[:10])
    assert torch.equal(hf["backbone.embeddings.weight"], embeddings[:10])
    assert hf["lm_head.weight"].data_ptr() != hf["backbone.embeddings.weight"].data_ptr()  # safetensors-safe


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"layers_block_type": ["linear_attention", "moe"]}, "MoE"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"use_bias": True}, "use_bias"),
    ({"mamba_proj_bias": True}, "mamba_proj_bias"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"mamba_hidden_act": "gelu"}, "mamba_hidden_act"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
])
def test_unsupported_nemotron_h_features_raise(overrides: dict, message: str) -> None:
    with pytest.raises(HFInteropError, match=message):
        hybrid_config_from_hf(tiny_nemotron_h_config(**overrides))


def test_unsupported_mamba2_features_raise() -> None:
    with pytest.raises(HFInteropError, match="use_bias"):
        hybrid_config_from_hf(tiny_mamba2_config(use_bias=True))
    with pytest.raises(HFInteropError, match="hidden_act"):
        hybrid_config_from_hf(tiny_mamba2_config(hidden_act="relu"))


def test_unknown_model_type_raises() -> None:
    with pytest.raises(HFInteropError, match="unsupported model_type 'llama'"):
        hybrid_config_from_hf({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(HFInteropError, match="unsupported model_type"):
        hybrid_config_from_hf(transformers.LlamaConfig())


def _small_config(**overrides) -> HybridConfig:
    fields = dict(num_layers=3, hidden_size=32, vocab_size=10, hybrid_override_pattern="M*-", num_attention_heads=4,
                  mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8)
    fields.update(overrides)
    return HybridConfig(**fields)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"activation": "swiglu"}, "swiglu"),
    ({"position_embedding_type": "rope"}, "position_embedding_type"),
    ({"add_bias_linear": True}, "add_bias_linear"),
])
def test_export_of_unsupported_features_raises(overrides: dict, message: str) -> None:
    with pytest.raises(HFInteropError, match=message):
        hf_config_from_hybrid(_small_config(**overrides))


def test_gelu_exports_as_gelu() -> None:
    assert hf_config_from_hybrid(_small_config(activation="gelu")).mlp_hidden_act == "gelu"


def test_swiglu_without_mlp_layers_exports() -> None:
    assert hf_config_from_hybrid(_small_config(hybrid_override_pattern="M**", activation="swiglu")) is not None


def test_state_dict_errors_name_the_tensors() -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    config = hybrid_config_from_hf(hf_model.config)
    hf_sd = _disk_state_dict(hf_model)

    missing = dict(hf_sd)
    del missing["backbone.layers.3.mixer.A_log"]
    with pytest.raises(HFInteropError, match=r"missing tensors \[backbone\.layers\.3\.mixer\.A_log\]"):
        state_dict_from_hf(missing, config)

    extra = dict(hf_sd, **{"backbone.layers.1.mixer.q_proj.bias": torch.zeros(32)})
    with pytest.raises(HFInteropError, match=r"unexpected tensors \[backbone\.layers\.1\.mixer\.q_proj\.bias\]"):
        state_dict_from_hf(extra, config)

    wrong = dict(hf_sd, **{"backbone.layers.2.mixer.up_proj.weight": torch.zeros(50, 32)})
    with pytest.raises(HFInteropError, match=r"backbone\.layers\.2\.mixer\.up_proj\.weight: expected \[48, 32\], "
                                             r"got \[50, 32\]"):
        state_dict_from_hf(wrong, config)

    no_head = dict(hf_sd)
    del no_head["lm_head.weight"]
    with pytest.raises(HFInteropError, match="lm_head.weight"):
        state_dict_from_hf(no_head, config)

    tied = config.replace(untie_embeddings_and_output_weights=False)
    with pytest.raises(HFInteropError, match="differs from the embeddings"):
        state_dict_from_hf(hf_sd, tied)

    mtp = dict(hf_sd, **{"mtp.layers.0.norm.weight": torch.ones(32)})  # ignored, as transformers does
    assert state_dict_from_hf(mtp, config).keys() == state_dict_from_hf(hf_sd, config).keys()


def test_export_state_dict_errors() -> None:
    config = _small_config(hybrid_override_pattern="-", num_layers=1, ffn_hidden_size=24)
    ours = {"embedding.word_embeddings.weight": torch.zeros(10, 32), "decoder.layers.0.pre_mlp_layernorm.weight":
            torch.ones(32), "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(24, 32),
            "decoder.final_norm.weight": torch.ones(32), "decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(24)}
    with pytest.raises(HFInteropError, match=r"missing tensors \[decoder\.layers\.0\.mlp\.linear_fc2\.weight\]; "
                                             r"unexpected tensors \[decoder\.layers\.0\.mlp\.linear_fc1\.bias\]"):
        state_dict_to_hf(ours, config)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_config(tmp_path / "nowhere")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError):
        load_hf_config(tmp_path / "file.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFInteropError, match="unsupported model_type 'gpt2'"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(HFInteropError, match="no model_type"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFInteropError, match="not valid JSON"):
        load_hf_config(tmp_path)

    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_hf_state_dict(tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf_state_dict(tmp_path)
