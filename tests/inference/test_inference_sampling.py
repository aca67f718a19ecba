"""Sampling: top-k / top-p masks against hand-computed ones, seeded reproducibility, log-probs against the full
forward, stop tokens, stop strings and incremental detokenization."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testlib import ByteTokenizer, CharTokenizer, full_logits, make_model, random_ids

from megatron_hybrid.inference import IncrementalDetokenizer, InferenceEngine, SamplingParams
from megatron_hybrid.inference.sampling import filter_logits, sample_tokens, top_k_mask, top_p_mask

# ---------------------------------------------------------------------------------------------------- logit filters


def test_top_k_mask_hand_computed() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0], [0.0, 0.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    removed = top_k_mask(logits, torch.tensor([2, 3, 0]))
    expected = torch.tensor(
        [
            [True, True, True, False, False],  # keeps 5 and 4
            [True, True, False, False, False],  # 3rd largest is 1: both 1s survive (ties at the boundary kept)
            [False, False, False, False, False],  # k = 0: off
        ]
    )
    assert torch.equal(removed, expected)


def test_top_p_mask_hand_computed() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = probs.log().expand(4, 5)
    # Descending: 0.5, 0.2, 0.15, 0.1, 0.05; mass before each: 0, 0.5, 0.7, 0.85, 0.95. Removed: mass before > p.
    removed = top_p_mask(logits, torch.tensor([0.45, 0.75, 0.0, 1.0]))
    expected = torch.tensor(
        [
            [True, False, True, True, True],  # p = 0.45: only the most likely token
            [True, False, True, False, False],  # p = 0.75: 0.5, 0.2, 0.15 (the token crossing p stays)
            [False] * 5,  # 0: off
            [False] * 5,  # 1: off
        ]
    )
    assert torch.equal(removed, expected)


def test_filter_order_temperature_then_top_k_then_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, torch.tensor([2.0]), torch.tensor([3]), torch.tensor([0.8]))
    scaled = logits / 2.0
    top3 = torch.softmax(scaled[0, :3], dim=-1)  # 0.506, 0.307, 0.186: mass before the third is 0.81 > 0.8
    assert top3[:2].sum() > 0.8
    assert torch.equal(torch.isinf(out[0]), torch.tensor([False, False, True, True, True]))
    assert torch.allclose(out[0, :2], scaled[0, :2])


def test_sampling_respects_filters_and_seeds() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, 4.8, 1.0]]).expand(400, 5)
    params = [SamplingParams(top_k=2)] * 400
    generators = [torch.Generator().manual_seed(i) for i in range(400)]
    tokens, logprobs = sample_tokens(logits, params, generators, want_logprobs=True)
    assert set(tokens) == {1, 2}
    raw = torch.log_softmax(logits[0], dim=-1)
    assert all(math.isclose(lp, raw[t].item(), rel_tol=1e-6) for t, lp in zip(tokens, logprobs))
    again, _ = sample_tokens(logits, params, [torch.Generator().manual_seed(i) for i in range(400)])
    assert again == tokens
    greedy, _ = sample_tokens(logits[:2], [SamplingParams(temperature=0.0), SamplingParams(top_k=1)], [None, None])
    assert greedy == [1, 1]


def test_greedy_takes_the_first_maximum_like_argmax() -> None:
    """Greedy rows pick ``argmax``'s token (the lowest id among tied maxima, a NaN if there is one), also in a batch
    that mixes greedy and sampled rows."""
    logits = torch.randint(0, 3, (64, 4099)).float()  # many ties
    logits[4, 17] = float("nan")  # a greedy row in both batches below
    greedy = [SamplingParams(temperature=0.0)] * 64
    tokens, _ = sample_tokens(logits, greedy, [None] * 64)
    assert tokens == logits.argmax(dim=-1).tolist()
    mixed = [SamplingParams(temperature=0.0), SamplingParams(seed=3)] * 32
    tokens, _ = sample_tokens(logits, mixed, [None if p.greedy else torch.Generator().manual_seed(1) for p in mixed])
    assert tokens[::2] == logits[::2].argmax(dim=-1).tolist()
    assert all(0 <= t < 4099 for t in tokens[1::2])


def test_sampling_params_validation() -> None:
    bad = [
        dict(max_new_tokens=-1), dict(max_new_tokens=2.5), dict(temperature=-0.1), dict(temperature=math.inf),
        dict(top_k=-1), dict(top_p=1.5), dict(top_p=-0.1), dict(seed="1"), dict(stop_token_ids=(-3,)),
        dict(stop_strings=("",)),
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            SamplingParams(**fields).validate()
    params = SamplingParams(stop_token_ids=[1, 2], stop_strings=["x"])
    params.validate()
    assert params.stop_token_ids == (1, 2) and params.stop_strings == ("x",)


# ---------------------------------------------------------------------------------------------------- engine level


@pytest.fixture(scope="module")
def model():
    return make_model("hybrid_rope_swiglu_bias", seed=4)


def _prompts(model, lengths=(6, 11, 3)) -> list[list[int]]:
    return [random_ids(model.config.vocab_size, n, seed=20 + i) for i, n in enumerate(lengths)]


def test_seed_reproducible_and_independent_of_batch(model) -> None:
    engine = InferenceEngine(model, max_batch_size=4, max_sequence_length=40)
    prompts = _prompts(model)
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=7)
    alone = engine.generate(prompts[:1], params)[0].token_ids
    batched = engine.generate(prompts, params)
    assert batched[0].token_ids == alone
    assert engine.generate(prompts[:1], params)[0].token_ids == alone
    other_seed = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, seed=8)
    assert engine.generate(prompts[:1], other_seed)[0].token_ids != alone


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_logprobs_are_raw_model_log_softmax(model, sampling: bool) -> None:
    """Generated and prompt log-probs equal log_softmax of the full forward's logits (before temperature/top-k/p)."""
    engine = InferenceEngine(model, max_batch_size=4, max_sequence_length=40)
    prompts = _prompts(model)
    if sampling:
        params = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=5, seed=3, logprobs=True, prompt_logprobs=True)
    else:
        params = SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=True, prompt_logprobs=True)
    for prompt, output in zip(prompts, engine.generate(prompts, params)):
        log_probs = torch.log_softmax(full_logits(model, prompt + output.token_ids), dim=-1)
        n = len(prompt)
        expected = log_probs[n - 1 : -1].gather(-1, torch.tensor(output.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(output.logprobs), expected, atol=1e-4)
        expected_prompt = log_probs[: n - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(output.prompt_logprobs), expected_prompt, atol=1e-4)
        if not sampling:
            assert output.token_ids == log_probs[n - 1 : -1].argmax(-1).tolist()


def test_stop_token_ends_generation(model) -> None:
    engine = InferenceEngine(model, CharTokenizer(model.config.vocab_size), max_batch_size=2, max_sequence_length=40)
    prompt = _prompts(model)[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=15, temperature=0.0))[0]
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=15, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is returned, as the last token
    assert out.text == engine.tokenizer.detokenize(free.token_ids[:first])  # ... but not as text


def test_stop_string_cuts_text_and_streams_no_part_of_it(model) -> None:
    tokenizer = CharTokenizer(model.config.vocab_size)
    engine = InferenceEngine(model, tokenizer, max_batch_size=2, max_sequence_length=40)
    prompt = _prompts(model)[1]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    assert free.text == tokenizer.detokenize(free.token_ids)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tokenizer.pieces[t] for t in free.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = free.text[start : start + len(pieces[2]) + 2]
    cut = free.text.find(stop)

    engine.add_request("r", prompt, SamplingParams(max_new_tokens=20, temperature=0.0, stop_strings=("@@", stop)))
    events = []
    while engine.has_unfinished():
        events.extend(engine.step())
    output = engine.pop_output("r")
    assert output.finish_reason == "stop" and events[-1].finish_reason == "stop"
    assert output.text == free.text[:cut]
    assert "".join(e.text for e in events) == output.text  # streamed pieces add up, without the stop string
    covering = next(i for i in range(len(pieces)) if len("".join(pieces[: i + 1])) >= cut + len(stop))
    assert output.token_ids == free.token_ids[: covering + 1]  # generation stopped at the completing token


def test_stop_strings_need_a_tokenizer(model) -> None:
    engine = InferenceEngine(model, max_batch_size=1, max_sequence_length=40)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("r", [1, 2], SamplingParams(max_new_tokens=4, stop_strings=("x",)))


def test_incremental_detokenizer_multibyte_and_holdback() -> None:
    text = "naïve café 東京 🙂 end"
    ids = list(text.encode("utf-8"))
    detok = IncrementalDetokenizer(ByteTokenizer().detokenize, prompt_ids=[ord(" ")], stop_strings=("東京 🙂 x",))
    streamed = ""
    for token in ids:
        detok.add(token)
        delta = detok.pop_delta()
        assert "\ufffd" not in delta
        streamed += delta
    detok.finish()
    streamed += detok.pop_delta(final=True)
    assert streamed == text == detok.text and not detok.stopped

    detok = IncrementalDetokenizer(ByteTokenizer().detokenize, stop_strings=("café",))
    streamed = ""
    for token in ids:
        detok.add(token)
        streamed += detok.pop_delta()
        assert "caf" not in streamed  # a possible beginning of the stop string is held back
        if detok.stopped:
            break
    assert detok.stopped and detok.text == "naïve " and streamed == "naïve "
