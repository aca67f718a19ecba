"""Tensor-parallel inference (TP = 2, two real processes on a gloo group) generates what TP = 1 generates.

Rank 0 drives an InferenceEngine over its shard of the model while rank 1 runs ``run_tp_worker``; the requests
(greedy and seeded sampling, log-probs, mixed prompt lengths, more requests than slots so that slots are refilled and
caches moved) cover every command the workers follow. The TP = 1 reference runs in the test process.
"""

from __future__ import annotations

import torch
from engine_testlib import make_model, random_ids

from megatron_hybrid.inference import InferenceEngine, SamplingParams, run_tp_worker
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.parallel.sharding import shard_state_dict
from megatron_hybrid.parallel.state import initialize_parallel_groups
from megatron_hybrid.parallel.testing import run_distributed

VARIANT = "hybrid_rope_swiglu_bias"
OVERRIDES = dict(make_vocab_size_divisible_by=2)  # 61 -> 62 rows: 31 per rank


def _requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    return [
        (random_ids(vocab, 9, seed=1), SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=True,
                                                      prompt_logprobs=True)),
        (random_ids(vocab, 4, seed=2), SamplingParams(max_new_tokens=3, temperature=0.8, top_k=6, seed=3,
                                                      logprobs=True)),
        (random_ids(vocab, 9, seed=3), SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.9, seed=4)),
        (random_ids(vocab, 13, seed=4), SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=True)),
    ]


def _generate(model: MambaModel) -> list[tuple[list[int], list[float] | None, list[float] | None]]:
    requests = _requests(model.config.vocab_size)
    with InferenceEngine(model, max_batch_size=2, max_sequence_length=32) as engine:
        outputs = engine.generate([p for p, _ in requests], [s for _, s in requests])
    return [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in outputs]


def _tp_rank(rank: int, world_size: int, full_state: dict[str, torch.Tensor]):
    groups = initialize_parallel_groups(tp=world_size)
    model = MambaModel(make_model(VARIANT, **OVERRIDES).config, groups)
    shard_state_dict(model, full_state, groups.tp_rank, groups.tp_size)
    model.eval()
    if groups.tp_rank == 0:
        return _generate(model)
    run_tp_worker(model)
    return None


def test_tensor_parallel_inference_matches_tp1() -> None:
    reference_model = make_model(VARIANT, **OVERRIDES)
    expected = _generate(reference_model)
    results = run_distributed(_tp_rank, 2, reference_model.state_dict(), timeout=240.0)
    assert results[1] is None
    for index, ((tokens, logprobs, prompt_logprobs), (want_tokens, want_logprobs, want_prompt)) in enumerate(
        zip(results[0], expected)
    ):
        assert tokens == want_tokens, f"request {index}"
        for got, want in ((logprobs, want_logprobs), (prompt_logprobs, want_prompt)):
            assert (got is None) == (want is None)
            if got is not None:
                assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), f"request {index}"
