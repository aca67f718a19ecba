"""Numerical parity with transformers: NemotronHForCausalLM and Mamba2ForCausalLM (pure-torch CPU paths) as oracle.

Logits are compared in float32 with the relative error ``max|ours - hf| / max|hf|`` (max over the whole
[batch, seq, vocab] tensor), which must not exceed 1e-4. Sequence lengths are deliberately not multiples of the
chunk size, and batches have more than one row.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_oracle import (
    build_hf_model,
    greedy_ours,
    hf_logits,
    perturb_,
    relative_error,
    tiny_mamba2_config,
    tiny_nemotron_h_config,
)

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.interop.hf import from_pretrained, save_pretrained
from megatron_hybrid.models.mamba_model import MambaModel

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # on relative_error: max|ours - hf| / max|hf|


def _ids(vocab: int, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


NEMOTRON_VARIANTS = {
    # name: (config overrides, batch, seqlen)
    "hybrid_gqa_ngroups2": ({}, 2, 21),
    "hybrid_tied": ({"tie_word_embeddings": True}, 3, 13),
    "mha_one_group": ({"num_key_value_heads": 4, "n_groups": 1,
                       "layers_block_type": ["full_attention", "linear_attention", "mlp"]}, 2, 9),
    "mamba_only_ngroups4": ({"n_groups": 4, "layers_block_type": ["linear_attention"] * 3}, 2, 30),
    "mqa_attention_mlp": ({"num_key_value_heads": 1, "layers_block_type": ["full_attention", "mlp"] * 2}, 2, 7),
    "gelu_mlp": ({"mlp_hidden_act": "gelu"}, 2, 10),
}


@pytest.mark.parametrize("variant", sorted(NEMOTRON_VARIANTS))
def test_nemotron_h_logits_match(variant: str, tmp_path) -> None:
    overrides, batch, seqlen = NEMOTRON_VARIANTS[variant]
    hf_model = build_hf_model(tiny_nemotron_h_config(**overrides))
    if overrides.get("tie_word_embeddings"):
        # transformers 5.x NemotronH does not tie; make the checkpoint genuinely tied so our tied model applies.
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(hf_model.model.embeddings.weight)
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.untie_embeddings_and_output_weights is not overrides.get("tie_word_embeddings", False)

    ids = _ids(hf_model.config.vocab_size, batch, seqlen)
    reference = hf_logits(hf_model, ids)
    with torch.no_grad():
        logits = ours(ids)
    assert logits.shape == reference.shape
    error = relative_error(logits, reference)
    assert error <= TOLERANCE, f"{variant}: relative error {error:.3g}"


def test_nemotron_h_untied_flag_but_equal_head_loads_tied(tmp_path) -> None:
    """NemotronH with tie_word_embeddings=True but a distinct lm_head (transformers never ties): we untie."""
    hf_model = build_hf_model(tiny_nemotron_h_config(tie_word_embeddings=True))
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.untie_embeddings_and_output_weights is True
    ids = _ids(61, 2, 11)
    with torch.no_grad():
        assert relative_error(ours(ids), hf_logits(hf_model, ids)) <= TOLERANCE


@pytest.mark.parametrize("tie", [False, True])
def test_mamba2_logits_match(tie: bool, tmp_path) -> None:
    hf_model = build_hf_model(tiny_mamba2_config(tie_word_embeddings=tie))
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.untie_embeddings_and_output_weights is not tie
    ids = _ids(hf_model.config.vocab_size, 2, 19)
    reference = hf_logits(hf_model, ids)
    with torch.no_grad():
        error = relative_error(ours(ids), reference)
    assert error <= TOLERANCE, f"relative error {error:.3g}"


def test_vocab_padding_does_not_change_logits(tmp_path) -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, make_vocab_size_divisible_by=64)
    assert ours.config.padded_vocab_size == 64
    assert torch.all(ours.embedding.word_embeddings.weight[61:] == 0)
    ids = _ids(61, 2, 12)
    with torch.no_grad():
        logits = ours(ids)
    assert logits.shape[-1] == 61
    assert relative_error(logits, hf_logits(hf_model, ids)) <= TOLERANCE


@pytest.mark.parametrize("kind", ["nemotron_h", "mamba2"])
def test_greedy_generation_matches_hf_generate(kind: str, tmp_path) -> None:
    # No eos: HF would stop (or, with min_new_tokens, mask it) where plain argmax decoding goes on.
    if kind == "nemotron_h":
        # No dt clamp (time_step_limit (0, inf); time_step_min, the init range, negligible as up to transformers 5.23
        # it was the clamp): HF's cached decode step does not apply the clamp its prefill applies, so a real clamp
        # would make HF disagree with itself, not with us.
        config = tiny_nemotron_h_config(time_step_min=1e-30, eos_token_id=None)
    else:
        config = tiny_mamba2_config(eos_token_id=None)
    hf_model = build_hf_model(config, seed=3)
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    prompt = _ids(config.vocab_size, 2, 10, seed=1)
    new_tokens = 12
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
    assert expected.shape == (2, 10 + new_tokens)
    assert torch.equal(greedy_ours(ours, prompt, new_tokens), expected)


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip_through_transformers(tie: bool, tmp_path) -> None:
    """HF -> ours -> our save_pretrained (sharded) -> NemotronHForCausalLM.from_pretrained: same logits."""
    hf_model = build_hf_model(tiny_nemotron_h_config(tie_word_embeddings=tie))
    if tie:
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(hf_model.model.embeddings.weight)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf", make_vocab_size_divisible_by=16)
    ours.save_pretrained(tmp_path / "export", max_shard_size="20KB")

    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert any(name.startswith("model-00002-of-") for name in files)
    saved_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert saved_config["model_type"] == "nemotron_h"
    assert saved_config["architectures"] == ["NemotronHForCausalLM"]

    reloaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    reloaded = reloaded.float().eval()
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = _ids(61, 2, 17)
    assert relative_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) == 0.0


def test_native_model_exports_to_transformers(tmp_path) -> None:
    """A model built here (random init, perturbed, padded vocab) runs identically in transformers after export."""
    config = HybridConfig(num_layers=5, hidden_size=32, vocab_size=45, hybrid_override_pattern="M*-M*",
                          num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40, mamba_state_dim=8,
                          mamba_head_dim=8, mamba_num_groups=2, mamba_chunk_size=8, make_vocab_size_divisible_by=16,
                          untie_embeddings_and_output_weights=True)
    torch.manual_seed(0)
    ours = MambaModel(config)
    perturb_(ours, seed=5)
    ours.eval()
    save_pretrained(ours, tmp_path)
    hf_model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids(45, 2, 14)
    with torch.no_grad():
        error = relative_error(ours(ids), hf_logits(hf_model, ids))
    assert error <= TOLERANCE, f"relative error {error:.3g}"

    again = from_pretrained(tmp_path, make_vocab_size_divisible_by=16)
    for name, tensor in ours.state_dict().items():
        expected = tensor[:45] if name in ("embedding.word_embeddings.weight", "output_layer.weight") else tensor
        assert torch.equal(again.state_dict()[name][: expected.shape[0]], expected), name


def test_save_into_existing_directory_replaces_weights_and_keeps_other_files(tmp_path) -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    hf_model.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    target = tmp_path / "out"
    save_pretrained(ours, target, max_shard_size="20KB")
    (target / "tokenizer.json").write_text("{}")
    save_pretrained(ours, target)  # now small enough for one file: the old shards and index must go
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # staging cleaned up
    reloaded = from_pretrained(target)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_from_pretrained_dtype(tmp_path) -> None:
    hf_model = build_hf_model(tiny_nemotron_h_config())
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.embedding.word_embeddings.weight.dtype == torch.bfloat16  # the checkpoint's dtype
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.get_parameter("decoder.layers.0.mixer.in_proj.weight").tp_dim == 0  # attributes survive the cast
    ours = from_pretrained(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert ours.config.params_dtype == torch.float32


def test_from_pretrained_reports_bad_tensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model = build_hf_model(tiny_nemotron_h_config())
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["backbone.layers.0.mixer.D"] = torch.zeros(7)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.D: expected \[8\], got \[7\]"):
        from_pretrained(tmp_path)


def test_loaded_model_is_a_complete_trainable_model(tmp_path) -> None:
    """from_pretrained skips the random init (meta device): every tensor must be real and keep its attributes."""
    import megatron_hybrid

    hf_model = build_hf_model(tiny_nemotron_h_config())
    hf_model.save_pretrained(tmp_path)
    ours = megatron_hybrid.from_pretrained(tmp_path)
    assert isinstance(ours, MambaModel)
    fresh = MambaModel(ours.config)
    for (name, param), (_, fresh_param) in zip(ours.named_parameters(), fresh.named_parameters()):
        assert not param.is_meta, name
        assert param.requires_grad, name
        attributes = {k: v for k, v in vars(fresh_param).items() if not k.startswith("_")}
        assert {k: getattr(param, k, None) for k in attributes} == attributes, name
    loss = ours(_ids(61, 2, 9), labels=_ids(61, 2, 9, seed=4))
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
