"""OpenAI-compatible ``POST /v1/completions`` (plain and streamed) against a real server (see server_testlib)."""

from __future__ import annotations

import pytest
from server_testlib import call, shared_server, sse_events


@pytest.fixture(scope="module")
def srv():
    return shared_server()


def greedy_ref(srv, prompt: str, n: int, **extra):
    ids = srv.tokenizer.tokenize(prompt)
    return ids, srv.reference(ids, max_new_tokens=n, temperature=0.0, stop_token_ids=(srv.tokenizer.eod,), **extra)


def pick_stop(text: str, start: int) -> str | None:
    """A 2-character piece of ``text`` at or after ``start`` without replacement characters (random models emit
    invalid byte sequences, shown as U+FFFD)."""
    for i in range(start, len(text) - 1):
        piece = text[i : i + 2]
        if "\ufffd" not in piece and piece.strip():
            return piece
    return None


def test_completion_shape_and_greedy_text(srv):
    status, body = call(srv, "POST", "/v1/completions", {"model": "anything", "prompt": "def main():",
                                                        "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny-test" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    ids, ref = greedy_ref(srv, "def main():", 10)
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == ref.text
    assert choice["finish_reason"] == ("stop" if ref.finish_reason == "stop" else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref.token_ids),
                             "total_tokens": len(ids) + len(ref.token_ids)}


def test_default_max_tokens_is_16(srv):
    _, body = call(srv, "POST", "/v1/completions", {"prompt": "x", "temperature": 0})
    assert body["usage"]["completion_tokens"] <= 16
    ids, ref = greedy_ref(srv, "x", 16)
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)


def test_list_of_prompts_and_token_prompts(srv):
    prompts = ["import os", "while x:", "return None"]
    _, body = call(srv, "POST", "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"]):
        assert choice["text"] == greedy_ref(srv, prompt, 6)[1].text
    ids = srv.tokenizer.tokenize("import os")
    _, by_ids = call(srv, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert by_ids["choices"][0]["text"] == body["choices"][0]["text"]
    _, nested = call(srv, "POST", "/v1/completions", {"prompt": [ids, ids], "max_tokens": 6, "temperature": 0})
    assert [c["text"] for c in nested["choices"]] == [body["choices"][0]["text"]] * 2


def test_logprobs_of_generated_tokens(srv):
    _, body = call(srv, "POST", "/v1/completions", {"prompt": "for i in", "max_tokens": 8, "temperature": 0,
                                                   "logprobs": 1})
    lp = body["choices"][0]["logprobs"]
    ids, ref = greedy_ref(srv, "for i in", 8, logprobs=True)
    visible = ref.token_ids[:-1] if ref.finish_reason == "stop" else ref.token_ids
    assert lp["token_logprobs"] == pytest.approx(ref.logprobs[: len(visible)], abs=1e-4)
    assert lp["tokens"] == [srv.tokenizer.detokenize([t]) for t in visible]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and len(lp["text_offset"]) == len(visible)
    assert [list(d.values())[0] for d in lp["top_logprobs"]] == lp["token_logprobs"]


def test_echo_scoring_with_zero_max_tokens(srv):
    prompt = "self.assertEqual(a, b)"
    _, body = call(srv, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    (choice,) = body["choices"]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    ids = srv.tokenizer.tokenize(prompt)
    ref = srv.reference(ids, max_new_tokens=0, prompt_logprobs=True)
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(ref.prompt_logprobs, abs=1e-4)
    assert "".join(lp["tokens"]) == prompt
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_with_generation(srv):
    _, body = call(srv, "POST", "/v1/completions", {"prompt": "if x:", "max_tokens": 5, "temperature": 0,
                                                   "echo": True})
    assert body["choices"][0]["text"] == "if x:" + greedy_ref(srv, "if x:", 5)[1].text


def test_stop_sequence_cuts_text(srv):
    ids, ref = greedy_ref(srv, "def run(self):", 30)
    text = ref.text
    stop = pick_stop(text, 6)
    if not stop:
        pytest.skip("greedy continuation too short for a stop sequence")
    _, body = call(srv, "POST", "/v1/completions", {"prompt": "def run(self):", "max_tokens": 30, "temperature": 0,
                                                   "stop": [stop, "never-appears"]})
    choice = body["choices"][0]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(srv):
    req = {"prompt": "print(", "max_tokens": 12, "temperature": 1.2, "top_p": 0.95, "top_k": 50, "seed": 7}
    _, a = call(srv, "POST", "/v1/completions", req)
    _, b = call(srv, "POST", "/v1/completions", req)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_stream_events_rebuild_the_completion(srv):
    req = {"prompt": "def main():", "max_tokens": 20, "temperature": 0}
    _, plain = call(srv, "POST", "/v1/completions", req)
    status, events = sse_events(srv, "/v1/completions", {**req, "stream": True,
                                                        "stream_options": {"include_usage": True}})
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == plain["choices"][0]["finish_reason"] and all(r is None for r in reasons[:-1])
    assert len(chunks) >= 3  # really incremental


def test_stream_with_stop_logprobs_and_echo(srv):
    ids, ref = greedy_ref(srv, "class A:", 30)
    text = ref.text
    stop = pick_stop(text, 4)
    if not stop:
        pytest.skip("greedy continuation too short for a stop sequence")
    req = {"prompt": "class A:", "max_tokens": 30, "temperature": 0, "stop": stop, "logprobs": 1, "echo": True}
    _, plain = call(srv, "POST", "/v1/completions", req)
    _, events = sse_events(srv, "/v1/completions", {**req, "stream": True})
    chunks = [e for e in events if e != "[DONE]"]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == plain["choices"][0]["text"] == "class A:" + text[: text.index(stop)]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == plain["choices"][0]["logprobs"]["tokens"]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == plain["choices"][0]["logprobs"]["text_offset"]


def test_stream_of_several_prompts(srv):
    prompts = ["a = 1", "b = 2"]
    _, plain = call(srv, "POST", "/v1/completions", {"prompt": prompts, "max_tokens": 8, "temperature": 0})
    _, events = sse_events(srv, "/v1/completions", {"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                                    "stream": True})
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in plain["choices"]]


def test_legacy_completions_path(srv):
    status, body = call(srv, "POST", "/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"


def assert_logprobs_equal(got: dict, want: dict) -> None:
    """Same tokens and offsets exactly; log-probabilities within 1e-4 (a batch of other shape may round differently),
    ``null`` exactly where the other has ``null``."""
    assert got["tokens"] == want["tokens"]
    assert got["text_offset"] == want["text_offset"]
    assert [x is None for x in got["token_logprobs"]] == [x is None for x in want["token_logprobs"]]
    assert [x for x in got["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in want["token_logprobs"] if x is not None], abs=1e-4)
    assert [None if d is None else list(d) for d in got["top_logprobs"]] == [
        None if d is None else list(d) for d in want["top_logprobs"]]


@pytest.mark.parametrize("sampling", [{"temperature": 0, "seed": 5}, {"temperature": 0.8, "top_k": 20, "seed": 11}],
                         ids=["greedy", "seeded-sampling"])
def test_stream_echo_logprobs_equal_the_plain_answer(srv, sampling):
    """OpenAI's legacy echo: the stream's first chunk of each choice carries the prompt's text and its tokens'
    log-probabilities (the first one ``null``), later chunks the generated tokens; concatenated per choice they equal
    the non-streamed answer, which itself matches the engine alone."""
    prompts = ["def run(self):", "x = [1, 2"]
    req = {"prompt": prompts, "max_tokens": 12, "echo": True, "logprobs": 1, **sampling}
    status, plain = call(srv, "POST", "/v1/completions", req)
    assert status == 200, plain
    status, events = sse_events(srv, "/v1/completions", {**req, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    tok = srv.tokenizer
    for index, (prompt, want) in enumerate(zip(prompts, plain["choices"])):
        ids = tok.tokenize(prompt)
        n = len(ids)
        lp = want["logprobs"]
        ref = srv.reference(ids, max_new_tokens=0, prompt_logprobs=True)
        assert lp["tokens"][:n] == [tok.detokenize([t]) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:n] == pytest.approx(ref.prompt_logprobs, abs=1e-4)
        assert len(lp["tokens"]) > n  # generated tokens follow the prompt's
        chunks = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        first = chunks[0]["logprobs"]
        assert chunks[0]["text"].startswith(prompt) and first["tokens"][:n] == lp["tokens"][:n]
        assert None not in first["token_logprobs"][1:n]  # sent with the echo, not null for want of the end
        assert len(chunks) >= 3  # the generation is really streamed after the echo
        streamed = {key: [x for c in chunks for x in c["logprobs"][key]] for key in lp}
        assert_logprobs_equal(streamed, lp)
        assert "".join(c["text"] for c in chunks) == want["text"]
        assert [c["finish_reason"] for c in chunks][-1] == want["finish_reason"]
