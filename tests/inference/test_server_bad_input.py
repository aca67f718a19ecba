"""Bad input gets a 4xx JSON error and the server keeps serving (checked with /health after every case)."""

from __future__ import annotations

import http.client
import json

import pytest
from server_testlib import CONTEXT, call, shared_server


@pytest.fixture(scope="module")
def srv():
    return shared_server()


def still_serving(srv) -> None:
    status, body = call(srv, "GET", "/health")
    assert status == 200 and body["status"] == "ok", body


LONG_TEXT = "word " * (CONTEXT + 10)

# (case id, body, expected status, substring of Megatron's "message"): malformed bodies and the context. Every field
# rule of PUT /api (Megatron's validation table) has its case, with the exact message, in
# test_server_megatron_validation.py.
MEGATRON_CASES = [
    ("malformed-json", b'{"prompts": ["a"', 400, "malformed JSON"),
    ("not-an-object", b'["a"]', 400, "JSON object"),
    ("nan", b'{"prompts": ["a"], "temperature": NaN}', 400, "malformed JSON"),
    ("invalid-utf8", b'{"prompts": ["\xff\xfe"]}', 400, "not valid UTF-8"),
    ("lone-surrogate", b'{"prompts": ["\\ud800"]}', 400, "invalid Unicode"),
    ("tokens-huge", {"prompts": ["a"], "tokens_to_generate": 10**12}, 400, "longer than allowed"),
    ("prompt-too-long", {"prompts": [LONG_TEXT], "tokens_to_generate": 1}, 400, "longer than allowed"),
]


@pytest.mark.parametrize("body,status,message", [c[1:] for c in MEGATRON_CASES], ids=[c[0] for c in MEGATRON_CASES])
def test_megatron_api_rejects(srv, body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = call(srv, "PUT", "/api", raw=raw)
    assert got == status, answer
    assert message in answer["message"], answer
    still_serving(srv)


OPENAI_CASES = [
    ("malformed-json", b"{", 400, "malformed JSON", None),
    ("invalid-utf8", b'{"prompt": "\xc3\x28"}', 400, "not valid UTF-8", None),
    ("no-prompt", {"max_tokens": 3}, 400, "prompt is required", "prompt"),
    ("prompt-number", {"prompt": 5}, 400, "prompt must be", "prompt"),
    ("prompt-mixed-list", {"prompt": ["a", 1]}, 400, "prompt must be", "prompt"),
    ("prompt-empty-list", {"prompt": []}, 400, "prompt must be", "prompt"),
    ("token-out-of-vocab", {"prompt": [1, 10**9]}, 400, "token ids must be in", "prompt"),
    ("negative-token", {"prompt": [[1, -2]]}, 400, "token ids must be in", "prompt"),
    ("max-tokens-negative", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens must be", "max_tokens"),
    ("max-tokens-string", {"prompt": "a", "max_tokens": "3"}, 400, "max_tokens must be", "max_tokens"),
    ("max-tokens-huge", {"prompt": "a", "max_tokens": 10**9}, 400, "maximum context length", "prompt"),
    ("prompt-too-long", {"prompt": LONG_TEXT, "max_tokens": 1}, 400, "maximum context length", "prompt"),
    ("max-tokens-zero-no-echo", {"prompt": "a", "max_tokens": 0}, 400, "requires echo", "max_tokens"),
    ("temperature-negative", {"prompt": "a", "temperature": -0.1}, 400, "temperature must be", "temperature"),
    ("temperature-too-big", {"prompt": "a", "temperature": 2.5}, 400, "temperature must be", "temperature"),
    ("temperature-huge-int", {"prompt": "a", "temperature": 10**400}, 400, "temperature must be", "temperature"),
    ("top-p-zero", {"prompt": "a", "top_p": 0}, 400, "top_p must be", "top_p"),
    ("top-k-bad", {"prompt": "a", "top_k": -3}, 400, "top_k must be", "top_k"),
    ("stop-number", {"prompt": "a", "stop": 5}, 400, "stop must be", "stop"),
    ("stop-empty", {"prompt": "a", "stop": [""]}, 400, "stop must be", "stop"),
    ("stop-too-many", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ("seed-float", {"prompt": "a", "seed": 1.5}, 400, "seed must be", "seed"),
    ("logprobs-bool", {"prompt": "a", "logprobs": True}, 400, "logprobs must be", "logprobs"),
    ("logprobs-too-many", {"prompt": "a", "logprobs": 6}, 400, "logprobs must be", "logprobs"),
    ("echo-string", {"prompt": "a", "echo": "yes"}, 400, "echo must be a boolean", "echo"),
    ("stream-int", {"prompt": "a", "stream": 1}, 400, "stream must be a boolean", "stream"),
    ("n-two", {"prompt": "a", "n": 2}, 400, "n > 1 is not supported", "n"),
    ("best-of-two", {"prompt": "a", "best_of": 2}, 400, "best_of > 1 is not supported", "best_of"),
    ("penalty", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty is not supported",
     "presence_penalty"),
    ("logit-bias", {"prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias is not supported", "logit_bias"),
    ("stream-options-without-stream", {"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "only allowed with stream", "stream_options"),
    ("lone-surrogate", b'{"prompt": "a\\udc00b"}', 400, "invalid Unicode", "prompt"),
]


@pytest.mark.parametrize("body,status,message,param", [c[1:] for c in OPENAI_CASES],
                         ids=[c[0] for c in OPENAI_CASES])
def test_completions_rejects(srv, body, status, message, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = call(srv, "POST", "/v1/completions", raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert message in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] == param
    still_serving(srv)


def test_stream_request_errors_before_the_stream(srv):
    got, answer = call(srv, "POST", "/v1/completions", {"prompt": "a", "stream": True, "temperature": 9})
    assert got == 400 and "temperature" in answer["error"]["message"]
    still_serving(srv)


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 10 * 1024 * 1024])
def test_body_size_limit(srv, size):
    body = b'{"prompts": ["' + b"a" * (size - 16) + b'"]}'
    assert len(body) >= size
    got, answer = call(srv, "PUT", "/api", raw=body)
    assert got == 413, answer
    assert "too large" in answer["message"]
    got, answer = call(srv, "POST", "/v1/completions", raw=body)
    assert got == 413 and "too large" in answer["error"]["message"]
    still_serving(srv)


def test_chunked_body_over_the_limit(srv):
    """No Content-Length (chunked transfer): the limit is enforced while reading."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    chunks = [b'{"prompt": "'] + [b"b" * 65536] * 40 + [b'"}']
    conn.request("POST", "/v1/completions", body=iter(chunks), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 413 and "too large" in answer["error"]["message"]
    still_serving(srv)


def test_body_just_under_the_limit_is_read(srv):
    prompt = "x" * (1024 * 1024 - 64)
    got, answer = call(srv, "PUT", "/api", {"prompts": [prompt], "tokens_to_generate": 1})
    assert got == 400 and "longer than allowed" in answer["message"]  # read, tokenized, then over the context


@pytest.mark.parametrize("method,path,status", [("GET", "/api", 405), ("POST", "/api", 405),
                                                ("GET", "/v1/completions", 405), ("GET", "/nope", 404)])
def test_wrong_method_or_path(srv, method, path, status):
    got, answer = call(srv, method, path)
    assert got == status and isinstance(answer, dict), answer
    still_serving(srv)
