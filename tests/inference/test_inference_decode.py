"""Cached generation equals the full-sequence forward: prefill + one-token decode steps, every layer type.

A batch of prompts of different lengths (1, 5 and 13 tokens with chunk size 8: below, across and beyond a chunk;
two equally long ones prefilled together) is prefilled into cache slots, then decoded together with teacher-forced
tokens. At every step each row's logits must equal the full forward of that row's whole sequence at its last
position (float32, relative error <= 1e-4), so no padding, neighbouring row or stale slot content leaks into a state.
Midway one sequence finishes and the last slot's caches move into its slot, as the engine does.
Both decode implementations run: the layers' decode paths and the CPU LeanDecoder.
"""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TOLERANCE, VARIANTS, full_logits, make_model, random_ids, relative_error

from megatron_hybrid.inference.lean_decode import LeanDecoder
from megatron_hybrid.inference.model_runner import ModelRunner

PROMPT_LENGTHS = [5, 13, 1, 13]  # the two 13-token prompts are prefilled together
DECODE_STEPS = 7


@pytest.mark.parametrize("lean", [False, True], ids=["layers", "lean"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decode_matches_full_forward(variant: str, lean: bool) -> None:
    model = make_model(variant)
    vocab = model.config.vocab_size
    runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32, lean_decode=lean)
    assert (runner.lean_decoder is not None) == lean
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
