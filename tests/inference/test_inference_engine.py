"""The engine: continuous batching (requests joining mid-flight get what they would get alone), queueing beyond
the slot count, abort, validation, cache memory report, greedy parity with transformers' NemotronH ``generate``."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import CharTokenizer, hf_oracle, make_model, random_ids

from megatron_hybrid import from_pretrained
from megatron_hybrid.inference import InferenceEngine, SamplingParams


@pytest.fixture(scope="module")
def model():
    return make_model("hybrid_rope_swiglu_bias", seed=1)


def _requests(model) -> list[tuple[list[int], SamplingParams]]:
    vocab = model.config.vocab_size
    return [
        (random_ids(vocab, 7, seed=1), SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=True)),
        (random_ids(vocab, 12, seed=2), SamplingParams(max_new_tokens=6, temperature=0.9, top_k=8, seed=11)),
        (random_ids(vocab, 3, seed=3), SamplingParams(max_new_tokens=14, temperature=1.1, top_p=0.9, seed=5)),
        (random_ids(vocab, 12, seed=4), SamplingParams(max_new_tokens=1, temperature=0.0)),
        (random_ids(vocab, 9, seed=5), SamplingParams(max_new_tokens=8, temperature=0.0)),
    ]


def _alone(model, requests) -> list[list[int]]:
    engine = InferenceEngine(model, max_batch_size=1, max_sequence_length=32)
    return [engine.generate([prompt], params)[0].token_ids for prompt, params in requests]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "layers"])
def test_requests_added_mid_flight_match_running_alone(model, lean: bool) -> None:
    requests = _requests(model)
    expected = _alone(model, requests)
    engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=32, lean_decode=lean)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> requests added before it; 5 requests, 3 slots
    step = 0
    while step in arrivals or engine.has_unfinished():
        for index in arrivals.get(step, []):
            engine.add_request(f"r{index}", *requests[index])
        for event in engine.step():
            assert event.request_id not in finished, "event after the request finished"
            tokens.setdefault(event.request_id, []).append(event.token_id)
            if event.finished:
                finished[event.request_id] = event.finish_reason
        assert engine.num_active() <= 3
        step += 1
    for index, want in enumerate(expected):
        assert tokens[f"r{index}"] == want, f"request {index}"
        output = engine.pop_output(f"r{index}")
        assert output.token_ids == want and output.finish_reason == "length"
    assert not engine.has_unfinished()


def test_generate_returns_outputs_in_prompt_order(model) -> None:
    requests = _requests(model)
    engine = InferenceEngine(model, max_batch_size=2, max_sequence_length=32)
    outputs = engine.generate([p for p, _ in requests], [s for _, s in requests])
    assert [o.token_ids for o in outputs] == _alone(model, requests)
    assert [o.prompt_ids for o in outputs] == [p for p, _ in requests]
    assert not engine.has_unfinished()


def test_abort_frees_the_slot(model) -> None:
    requests = _requests(model)
    expected = _alone(model, requests)
    engine = InferenceEngine(model, max_batch_size=2, max_sequence_length=32)
    for index in (0, 2, 4):
        engine.add_request(f"r{index}", *requests[index])
    engine.step()
    assert engine.num_active() == 2 and engine.num_waiting() == 1
    engine.abort("r0")  # active: its slot is freed at once
    assert engine.num_active() == 1
    events = engine.step()
    assert events[0].request_id == "r0" and events[0].finish_reason == "abort" and events[0].token_id == -1
    assert engine.num_active() == 2 and engine.num_waiting() == 0  # r4 took the freed slot
    seen = {}
    while engine.has_unfinished():
        for event in engine.step():
            assert event.request_id != "r0"
            seen.setdefault(event.request_id, []).append(event.token_id)
    assert engine.pop_output("r4").token_ids == expected[4]
    assert engine.pop_output("r2").token_ids == expected[2]
    with pytest.raises(KeyError):
        engine.pop_output("r0")  # aborted requests keep no output
    engine.add_request("w", *requests[1])
    engine.abort("w")  # a waiting request
    assert not engine.has_unfinished()
    assert [e.finish_reason for e in engine.step()] == ["abort"]
    engine.abort("never-seen")  # unknown ids are ignored


def test_validation_errors(model) -> None:
    engine = InferenceEngine(model, max_batch_size=2, max_sequence_length=16)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], ok)
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        engine.add_request("a", [1] * 13, ok)
    with pytest.raises(ValueError, match="vocabulary|not an id"):
        engine.add_request("a", [1, model.config.vocab_size], ok)
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("a", [1], SamplingParams(top_p=2.0))
    engine.add_request("a", [1] * 12, ok)  # exactly fills the context
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], ok)
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pop_output("a").token_ids) == 4


def test_scoring_only_request_returns_prompt_logprobs(model) -> None:
    engine = InferenceEngine(model, CharTokenizer(model.config.vocab_size), max_batch_size=2, max_sequence_length=32)
    prompt = random_ids(model.config.vocab_size, 6, seed=9)
    engine.add_request("s", prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=True))
    (event,) = engine.step()
    assert event.finished and event.finish_reason == "length" and event.token_id == -1 and event.text == ""
    output = engine.pop_output("s")
    assert output.token_ids == [] and output.text == "" and len(output.prompt_logprobs) == 5
    assert engine.num_active() == 0


def test_cache_memory_report(model) -> None:
    config = model.config
    engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=20)
    report = engine.cache_memory_bytes()
    pattern = config.layer_pattern
    conv_dim = config.mamba_d_inner + 2 * config.mamba_num_groups * config.mamba_state_dim
    assert report["mamba_conv_state"] == pattern.count("M") * 3 * conv_dim * config.mamba_conv_kernel * 4
    assert report["mamba_ssm_state"] == (
        pattern.count("M") * 3 * config.mamba_num_heads * config.mamba_head_dim * config.mamba_state_dim * 4
    )
    assert report["attention_kv"] == pattern.count("*") * 2 * 3 * config.num_query_groups * 20 * config.kv_channels * 4
    assert report["total"] == report["mamba_conv_state"] + report["mamba_ssm_state"] + report["attention_kv"]
    assert report["per_sequence"] == report["total"] // 3


def test_cuda_graphs_flag_is_ignored_on_cpu(model) -> None:
    with pytest.warns(UserWarning, match="CUDA"):
        engine = InferenceEngine(model, max_batch_size=1, max_sequence_length=16, use_cuda_graphs=True)
    assert not engine.use_cuda_graphs
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0.0))[0].token_ids) == 3


def test_greedy_matches_transformers_nemotron_h_generate(tmp_path) -> None:
    """Same weights in transformers' NemotronHForCausalLM: our engine's greedy tokens equal HF ``generate``.

    HF's cached decode step skips the dt clamp (time_step_limit; time_step_min up to transformers 5.23) its prefill
    applies, so the oracle keeps that clamp negligible; prompts of different lengths run in ONE engine batch but
    through separate HF calls.
    """
    oracle = hf_oracle()
    config = oracle.tiny_nemotron_h_config(time_step_min=1e-30, eos_token_id=None)
    hf_model = oracle.build_hf_model(config, seed=3)
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    prompts = [random_ids(config.vocab_size, n, seed=40 + n) for n in (10, 4, 13)]
    new_tokens = 12
    outputs = InferenceEngine(ours, max_batch_size=4, max_sequence_length=32).generate(
        prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    )
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)[0, len(prompt):]
        assert output.token_ids == expected.tolist()
