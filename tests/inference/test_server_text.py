"""The server's per-request text logic on real token sequences of a real tokenizer: incremental detokenization,
stop strings (OpenAI: cut before; Megatron: keep the completing token), end-of-document handling, streamed deltas."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_testlib import train_tiny_tokenizer

from megatron_hybrid.inference.server import _Completion


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return train_tiny_tokenizer(Path(tmp_path_factory.mktemp("tok")))


def feed(c: _Completion, ids: list[int], finish_reason: str = "length") -> list[str]:
    deltas = []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        done = c.add(t, -0.5, last, finish_reason if last else None)
        deltas.append(c.take_delta())
        if done:
            break
    return deltas


def completion(tok, prompt: str, stops=(), include_stop=False) -> _Completion:
    return _Completion(tok.tokenize(prompt), tuple(stops), frozenset((tok.eod,)), include_stop, tok)


@pytest.mark.parametrize("text", ["hello world, this is text", "Déjà vu — naïve café, 東京, emoji 🙂", "a\n\tb  c"])
def test_streamed_deltas_rebuild_the_text_without_partial_characters(tok, text):
    ids = tok.tokenize(text)
    c = completion(tok, "x = ")
    deltas = feed(c, ids)
    assert "".join(deltas) == c.output_text == tok.detokenize(tok.tokenize("x = ") + ids)[len("x = "):]
    assert not any("\ufffd" in d for d in deltas)
    assert c.finish_reason == "length" and c.visible_token_count == len(ids)


def test_openai_stop_string_is_cut_off_and_never_streamed(tok):
    ids = tok.tokenize("alpha beta STOP gamma delta")
    c = completion(tok, "q:", stops=("STOP", "zzz"))
    deltas = feed(c, ids)
    assert c.finish_reason == "stop"
    assert c.output_text == "alpha beta "
    assert "".join(deltas) == "alpha beta "
    assert all("S" not in d for d in deltas)  # the held-back "S", "ST", ... never escaped
    kept = c.visible_token_count
    assert tok.detokenize(ids[:kept]).startswith("alpha beta")
    assert "STOP" not in tok.detokenize(ids[:kept])


def test_megatron_double_eol_keeps_the_completing_token(tok):
    ids = tok.tokenize("one\ntwo\n\nthree")
    c = completion(tok, "p", stops=("\n\n",), include_stop=True)
    feed(c, ids)
    assert c.finish_reason == "stop"
    text = tok.detokenize(c.token_ids)
    assert text.endswith("\n\n") or text.endswith("\n")
    assert "\n\n" in text and "three" not in text
    assert c.token_ids == ids[: len(c.token_ids)]


def test_end_of_document_token(tok):
    ids = tok.tokenize("some words") + [tok.eod]
    openai = completion(tok, "p")
    feed(openai, ids, "stop")
    assert openai.finish_reason == "stop"
    assert openai.output_text == "some words"
    assert openai.visible_token_count == len(ids) - 1  # the EOD token is not part of the answer
    megatron = completion(tok, "p", include_stop=True)
    feed(megatron, ids, "stop")
    assert megatron.token_ids == ids  # Megatron returns the termination token


def test_no_token_event_finishes(tok):
    c = completion(tok, "p")
    assert c.add(-1, None, True, "length")
    assert c.done and c.token_ids == [] and c.output_text == ""
