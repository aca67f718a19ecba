"""Cached generation equals the full-sequence forward: prefill + one-token decode steps, every layer type.

A batch of prompts of different lengths (1, 5 and 13 tokens with chunk size 8: below, across and beyond a chunk;
two equally long ones prefilled together) is prefilled into cache slots, then decoded together with teacher-forced
tokens. At every step each row's logits must equal the full forward of that row's whole sequence at its last
position (float32, relative error <= 1e-4), so no padding, neighbouring row or stale slot content leaks into a state.
Midway one sequence finishes and the last slot's caches move into its slot, as the engine does.
Both decode implementations run: the layers' decode paths and the CPU LeanDecoder (with its transposed weight copies,
and reading the parameters in place); the LeanDecoder also prefills short prompts, which must leave the same caches
as the layers' prefill.
"""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TOLERANCE, VARIANTS, full_logits, make_model, random_ids, relative_error

from megatron_hybrid.inference.lean_decode import PREFILL_MAX_TOKENS, LeanDecoder
from megatron_hybrid.inference.model_runner import ModelRunner

PROMPT_LENGTHS = [5, 13, 1, 13]  # the two 13-token prompts are prefilled together
DECODE_STEPS = 7


@pytest.mark.parametrize("mode", ["layers", "lean", "lean_in_place"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decode_matches_full_forward(variant: str, mode: str) -> None:
    model = make_model(variant)
    lean = mode != "layers"
    runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32, lean_decode=lean)
    assert (runner.lean_decoder is not None) == lean
    if mode == "lean_in_place":  # no weight copies: the parameters are read where they are
        runner.lean_decoder = LeanDecoder(model, runner.context, max_prepared_bytes=0)
        assert not runner.lean_decoder.prepared
    _check_prefill_and_decode(runner, model, variant)


def _check_prefill_and_decode(runner: ModelRunner, model, variant: str) -> None:
    vocab = model.config.vocab_size
    sequences = [random_ids(vocab, length, seed=10 + i) for i, length in enumerate(PROMPT_LENGTHS)]
    continuations = [random_ids(vocab, DECODE_STEPS, seed=50 + i) for i in range(len(sequences))]
    # Causal model: the full forward of the whole sequence gives the reference for every prefix at once.
    references = [full_logits(model, s + c) for s, c in zip(sequences, continuations)]

    # Prefill: sequence 0 into slot 0, sequences 1 and 3 (13 tokens each) together into slots 1-2, 2 into slot 3.
    for slot, group in ((0, [0]), (1, [1, 3]), (3, [2])):
        prompts = torch.tensor([sequences[i] for i in group])
        logits = runner.prefill(slot, prompts)
        assert logits.shape == (len(group), 1, vocab)
        for row, index in enumerate(group):
            reference = references[index][len(sequences[index]) - 1]
            assert relative_error(logits[row, -1], reference) <= TOLERANCE, f"prefill of sequence {index}"
    rows = [0, 1, 3, 2]  # rows[slot] = the sequence in that slot

    for step in range(DECODE_STEPS):
        if step == 3:  # sequence in slot 1 finishes: the last slot's caches move into it
            runner.move_slot(len(rows) - 1, 1, length=len(sequences[rows[-1]]))
            rows[1] = rows.pop()
        tokens = [continuations[i][step] for i in rows]
        positions = [len(sequences[i]) for i in rows]
        logits = runner.decode(torch.tensor(tokens), torch.tensor(positions), attention_length=max(positions) + 1)
        for slot, index in enumerate(rows):
            sequences[index].append(continuations[index][step])
            reference = references[index][len(sequences[index]) - 1]
            error = relative_error(logits[slot], reference)
            assert error <= TOLERANCE, f"{variant}: step {step}, sequence {index}: relative error {error:.3g}"


def test_lean_copies_follow_parameter_updates() -> None:
    """The transposed weight copies are rebuilt when the parameters change (in place, by load_state_dict, or by
    assigning ``.data``), so the engine keeps decoding the model as it is now."""
    model = make_model("hybrid_rope_swiglu_bias")
    runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32)
    assert runner.lean_decoder is not None and runner.lean_decoder.prepared
    _check_prefill_and_decode(runner, model, "initial")
    new_weights = make_model("hybrid_rope_swiglu_bias", seed=7).state_dict()
    model.load_state_dict(new_weights)
    runner.context.reset()
    _check_prefill_and_decode(runner, model, "after load_state_dict")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.9)
    runner.context.reset()
    _check_prefill_and_decode(runner, model, "after an in-place update")
    fc1 = next(layer.mlp.linear_fc1 for layer in model.decoder.layers.values() if hasattr(layer, "mlp"))
    fc1.weight.data = fc1.weight.data * 1.1
    runner.context.reset()
    _check_prefill_and_decode(runner, model, "after assigning .data")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lean_prefill_leaves_the_layer_prefill_caches(variant: str) -> None:
    """Prompts up to PREFILL_MAX_TOKENS go through the LeanDecoder's prefill, longer ones through the layers: either
    way the logits of every position and the caches (conv, SSM, keys and values) are those of the layers' prefill."""
    model = make_model(variant, max_position_embeddings=PREFILL_MAX_TOKENS + 8)
    vocab, length_limit = model.config.vocab_size, PREFILL_MAX_TOKENS + 1
    reference = ModelRunner(model, max_batch_size=4, max_sequence_length=length_limit, lean_decode=False)
    runner = ModelRunner(model, max_batch_size=4, max_sequence_length=length_limit)
    for length in (1, 3, 13, PREFILL_MAX_TOKENS, PREFILL_MAX_TOKENS + 1):
        prompts = torch.tensor([random_ids(vocab, length, seed=20 + i) for i in range(2)])
        reference.context.reset()
        runner.context.reset()
        expected = reference.prefill(1, prompts, all_logits=True)
        logits = runner.prefill(1, prompts, all_logits=True)
        assert relative_error(logits, expected) <= TOLERANCE, f"{variant}: logits of a {length}-token prefill"
        assert relative_error(runner.prefill(1, prompts)[:, 0], expected[:, -1]) <= TOLERANCE
        caches = zip(
            (t for pair in (*runner.context.mamba.values(), *runner.context.kv.values()) for t in pair),
            (t for pair in (*reference.context.mamba.values(), *reference.context.kv.values()) for t in pair),
        )
        for cache, expected_cache in caches:
            scale = expected_cache.abs().max().clamp(min=1.0)
            assert (cache - expected_cache).abs().max() / scale <= TOLERANCE, f"{variant}: caches, length {length}"


def test_lean_decoder_refuses_what_it_cannot_run() -> None:
    model = make_model("hybrid_rope_swiglu_bias")
    assert LeanDecoder.unsupported_reason(model) is None
    assert "float32" in LeanDecoder.unsupported_reason(make_model("mamba_ngroups2").to(torch.float64))


def test_prefill_logits_of_every_prompt_position() -> None:
    model = make_model("hybrid_rope_swiglu_bias")
    runner = ModelRunner(model, max_batch_size=2, max_sequence_length=32)
    prompt = random_ids(model.config.vocab_size, 11, seed=3)
    logits = runner.prefill(1, torch.tensor(prompt), all_logits=True)
    assert relative_error(logits, full_logits(model, prompt)) <= TOLERANCE


def test_ssm_state_dtype_and_cache_layout() -> None:
    model = make_model("hybrid_rope_swiglu_bias")
    runner = ModelRunner(model, max_batch_size=3, max_sequence_length=20, ssm_state_dtype=torch.float64)
    config = model.config
    conv_dim = config.mamba_d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim
    for conv_state, ssm_state in runner.context.mamba.values():
        assert conv_state.shape == (3, conv_dim, config.mamba_conv_kernel) and conv_state.dtype == torch.float32
        assert ssm_state.shape == (3, config.mamba_num_heads, config.mamba_head_dim, config.mamba_state_dim)
        assert ssm_state.dtype == torch.float64
    for keys, values in runner.context.kv.values():
        assert keys.shape == values.shape == (3, config.num_query_groups, 20, config.kv_channels)
