"""Every ``PUT /api`` field rule (Megatron-LM's ``MegatronGenerate.put`` plus our "not supported" refusals), over real
HTTP against the one shared server (see server_testlib): each rejection with its exact message, each boundary that
must still be accepted, the order in which rules fire, and a check that the tables below cover every rule of
``MEGATRON_API_FIELDS`` (so a new rule cannot land without its HTTP test).

Messages are compared exactly: Megatron's ``tools/text_generation_cli.py`` and scripts written against Megatron's
server show or match them verbatim.
"""

from __future__ import annotations

import json

import pytest
from server_testlib import call, shared_server

from megatron_hybrid.inference.server import MEGATRON_API_FIELDS, ApiField, ApiRule, parse_megatron_request

MSG_TOKENS_TYPE = "tokens_to_generate must be an integer greater than 0"
MSG_TEMPERATURE = "temperature must be a positive number less than or equal to 100.0"
MSG_TOP_K_TYPE = "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"
MSG_TOP_K_RANGE = "top_k must be equal to or greater than 0 and less than or equal to 1000"
MSG_TOP_P_TYPE = "top_p must be a positive float less than or equal to 1.0"
MSG_DECAY_TYPE = "top_p_decay must be a positive float less than or equal to 1.0"
MSG_BOUND_TYPE = "top_p_bound must be a positive float less than or equal to top_p"
MSG_BOUND_RANGE = "top_p_bound must be greater than 0 and less than top_p"

A = ["a"]  # a valid one-prompt list

# (case id, body, exact message). Everything else in the body is valid, so the named rule is the one that fires.
REJECT_CASES = [
    # prompts (checked before the table, in Megatron's order)
    ("prompts-missing", {"tokens_to_generate": 1}, "prompts argument required"),
    ("max_len", {"prompts": A, "max_len": 5}, "max_len is no longer used.  Replace with tokens_to_generate"),
    ("sentences", {"prompts": A, "sentences": A}, "sentences is no longer used.  Replace with prompts"),
    ("prompts-string", {"prompts": "a"}, "prompts is not a list of strings"),
    ("prompts-null", {"prompts": None}, "prompts is not a list of strings"),
    ("prompts-empty", {"prompts": []}, "prompts is empty"),
    ("prompts-129", {"prompts": ["a"] * 129}, "Maximum number of prompts is 128"),
    ("prompts-129-ints", {"prompts": [1] * 129}, "Maximum number of prompts is 128"),  # count first, as Megatron
    ("prompts-ints", {"prompts": ["a", 1]}, "prompts is not a list of strings"),
    # tokens_to_generate
    ("tokens-string", {"prompts": A, "tokens_to_generate": "5"}, MSG_TOKENS_TYPE),
    ("tokens-float", {"prompts": A, "tokens_to_generate": 5.0}, MSG_TOKENS_TYPE),
    ("tokens-bool", {"prompts": A, "tokens_to_generate": True}, MSG_TOKENS_TYPE),
    ("tokens-null", {"prompts": A, "tokens_to_generate": None}, MSG_TOKENS_TYPE),
    ("tokens-negative", {"prompts": A, "tokens_to_generate": -1},
     "tokens_to_generate must be an integer greater than or equal to 0"),
    # logprobs, then the rule across the two
    ("logprobs-int", {"prompts": A, "logprobs": 1}, "logprobs must be a boolean value"),
    ("logprobs-null", {"prompts": A, "logprobs": None}, "logprobs must be a boolean value"),
    ("tokens-zero-no-logprobs", {"prompts": A, "tokens_to_generate": 0},
     "tokens_to_generate=0 implies logprobs should be True"),
    ("tokens-zero-logprobs-false", {"prompts": A, "tokens_to_generate": 0, "logprobs": False},
     "tokens_to_generate=0 implies logprobs should be True"),
    # temperature: (0, 100]
    ("temperature-string", {"prompts": A, "temperature": "1"}, MSG_TEMPERATURE),
    ("temperature-bool", {"prompts": A, "temperature": True}, MSG_TEMPERATURE),
    ("temperature-zero", {"prompts": A, "temperature": 0}, MSG_TEMPERATURE),
    ("temperature-negative", {"prompts": A, "temperature": -1.0}, MSG_TEMPERATURE),
    ("temperature-above-100", {"prompts": A, "temperature": 100.5}, MSG_TEMPERATURE),
    ("temperature-huge-int", {"prompts": A, "temperature": 10**400}, MSG_TEMPERATURE),  # was a 500 (OverflowError)
    ("temperature-inf", b'{"prompts": ["a"], "temperature": 1e400}', MSG_TEMPERATURE),  # JSON 1e400 parses to inf
    # top_k: integer in [0, 1000]
    ("top-k-float", {"prompts": A, "top_k": 1.5}, MSG_TOP_K_TYPE),
    ("top-k-bool", {"prompts": A, "top_k": True}, MSG_TOP_K_TYPE),
    ("top-k-negative", {"prompts": A, "top_k": -1}, MSG_TOP_K_RANGE),
    ("top-k-1001", {"prompts": A, "top_k": 1001}, MSG_TOP_K_RANGE),
    # top_p: number in [0, 1], not together with top_k (checked before the range, as Megatron)
    ("top-p-string", {"prompts": A, "top_p": "0.5"}, MSG_TOP_P_TYPE),
    ("top-p-null", {"prompts": A, "top_p": None}, MSG_TOP_P_TYPE),
    ("top-k-and-top-p", {"prompts": A, "top_k": 5, "top_p": 0.9}, "cannot set both top-k and top-p samplings."),
    ("top-k-and-top-p-above-1", {"prompts": A, "top_k": 5, "top_p": 1.5}, "cannot set both top-k and top-p samplings."),
    ("top-p-above-1", {"prompts": A, "top_p": 1.5}, "top_p must be less than or equal to 1.0"),
    ("top-p-negative", {"prompts": A, "top_p": -0.1}, "top_p must be less than or equal to 1.0"),
    # top_p_decay: needs top_p, in [0, 1], and only 0 is supported here
    ("top-p-decay-string", {"prompts": A, "top_p": 0.9, "top_p_decay": "0"}, MSG_DECAY_TYPE),
    ("top-p-decay-without-top-p", {"prompts": A, "top_p_decay": 0.0}, "top_p_decay cannot be set without top_p"),
    ("top-p-decay-above-1", {"prompts": A, "top_p": 0.9, "top_p_decay": 1.5},
     "top_p_decay must be less than or equal to 1.0"),
    ("top-p-decay-unsupported", {"prompts": A, "top_p": 0.9, "top_p_decay": 0.5},
     "top_p_decay is not supported by this server (top_p stays fixed during generation)"),
    # top_p_bound: needs top_p, in (0, top_p]
    ("top-p-bound-string", {"prompts": A, "top_p": 0.9, "top_p_bound": "0.1"}, MSG_BOUND_TYPE),
    ("top-p-bound-without-top-p", {"prompts": A, "top_p_bound": 0.1}, "top_p_bound cannot be set without top_p"),
    ("top-p-bound-zero", {"prompts": A, "top_p": 0.5, "top_p_bound": 0.0}, MSG_BOUND_RANGE),
    ("top-p-bound-above-top-p", {"prompts": A, "top_p": 0.5, "top_p_bound": 0.9}, MSG_BOUND_RANGE),
    # add_BOS, then empty prompts need it
    ("add-bos-string", {"prompts": A, "add_BOS": "yes"}, "add_BOS must be a boolean value"),
    ("empty-prompt", {"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ("one-empty-prompt-add-bos-false", {"prompts": ["a", ""], "add_BOS": False}, "Empty prompts require add_BOS=true"),
    # boolean flags
    ("stop-on-double-eol-int", {"prompts": A, "stop_on_double_eol": 1}, "stop_on_double_eol must be a boolean value"),
    ("stop-on-eol-string", {"prompts": A, "stop_on_eol": "true"}, "stop_on_eol must be a boolean value"),
    ("colon-int", {"prompts": A, "prevent_newline_after_colon": 0},
     "prevent_newline_after_colon must be a boolean value"),
    ("colon-true", {"prompts": A, "prevent_newline_after_colon": True},
     "prevent_newline_after_colon is not supported by this server"),
    # random_seed: integer >= 0 (and below 2**63 - 128: prompt i uses random_seed + i)
    ("seed-string", {"prompts": A, "random_seed": "1"}, "random_seed must be integer"),
    ("seed-float", {"prompts": A, "random_seed": 1.0}, "random_seed must be integer"),
    ("seed-negative", {"prompts": A, "random_seed": -5}, "random_seed must be a positive integer"),
    ("seed-too-big", {"prompts": A, "random_seed": 2**63 - 128}, "random_seed must be less than 2**63 - 128"),
    ("no-log-string", {"prompts": A, "no_log": "true"}, "no_log must be a boolean value"),
    # beam_width: Megatron's checks, then refused (no beam search here)
    ("beam-float", {"prompts": A, "beam_width": 2.0}, "beam_width must be integer"),
    ("beam-zero", {"prompts": A, "beam_width": 0}, "beam_width must be an integer > 1"),
    ("beam-batch", {"prompts": ["a", "b"], "beam_width": 2}, "When doing beam_search, batch size must be 1"),
    ("beam-unsupported", {"prompts": A, "beam_width": 1},
     "beam search (beam_width) is not supported by this server; leave beam_width out to sample"),
    ("stop-token-float", {"prompts": A, "stop_token": 1.0}, "stop_token must be an integer"),
    ("length-penalty-string", {"prompts": A, "length_penalty": "1"}, "length_penalty must be a float"),
    ("length-penalty-bool", {"prompts": A, "length_penalty": True}, "length_penalty must be a float"),
    # order: with several bad fields, the first in Megatron's order answers
    ("order-tokens-before-temperature", {"prompts": A, "tokens_to_generate": -1, "temperature": 0},
     "tokens_to_generate must be an integer greater than or equal to 0"),
    ("order-seed-before-no-log", {"prompts": A, "random_seed": -1, "no_log": 1},
     "random_seed must be a positive integer"),
    ("order-colon-before-seed", {"prompts": A, "prevent_newline_after_colon": True, "random_seed": -1},
     "prevent_newline_after_colon is not supported by this server"),
    ("order-empty-prompt-before-flags", {"prompts": [""], "stop_on_eol": 1}, "Empty prompts require add_BOS=true"),
]

# (case id, body): valid boundaries and types that must be served (200). tokens_to_generate stays tiny for speed.
ACCEPT_CASES = [
    ("defaults-only", {"prompts": A}),
    ("tokens-zero-with-logprobs", {"prompts": A, "tokens_to_generate": 0, "logprobs": True}),
    ("logprobs-true", {"prompts": A, "tokens_to_generate": 1, "logprobs": True}),
    ("temperature-100", {"prompts": A, "tokens_to_generate": 1, "temperature": 100.0}),
    ("temperature-small", {"prompts": A, "tokens_to_generate": 1, "temperature": 1e-3}),
    ("temperature-int", {"prompts": A, "tokens_to_generate": 1, "temperature": 2}),
    ("top-k-0", {"prompts": A, "tokens_to_generate": 1, "top_k": 0}),
    ("top-k-1000", {"prompts": A, "tokens_to_generate": 1, "top_k": 1000}),
    ("top-k-with-top-p-zero", {"prompts": A, "tokens_to_generate": 1, "top_k": 5, "top_p": 0.0}),
    ("top-p-1", {"prompts": A, "tokens_to_generate": 1, "top_p": 1.0}),
    ("top-p-int", {"prompts": A, "tokens_to_generate": 1, "top_p": 1}),  # Megatron wants a float; JSON can't say
    ("top-p-decay-zero", {"prompts": A, "tokens_to_generate": 1, "top_p": 0.9, "top_p_decay": 0.0}),
    ("top-p-bound-equal", {"prompts": A, "tokens_to_generate": 1, "top_p": 0.5, "top_p_bound": 0.5}),
    ("add-bos-empty-prompt", {"prompts": [""], "tokens_to_generate": 1, "add_BOS": True}),
    ("flags-true", {"prompts": A, "tokens_to_generate": 1, "stop_on_eol": True, "stop_on_double_eol": True,
                    "no_log": True}),
    ("colon-false", {"prompts": A, "tokens_to_generate": 1, "prevent_newline_after_colon": False}),
    ("seed-zero", {"prompts": A, "tokens_to_generate": 1, "random_seed": 0}),
    ("seed-max", {"prompts": A, "tokens_to_generate": 1, "random_seed": 2**63 - 129}),
    ("stop-token", {"prompts": A, "tokens_to_generate": 1, "stop_token": 50256}),
    ("length-penalty", {"prompts": A, "tokens_to_generate": 1, "length_penalty": 1.5}),
    ("length-penalty-int", {"prompts": A, "tokens_to_generate": 1, "length_penalty": 1}),
    ("unknown-field-ignored", {"prompts": A, "tokens_to_generate": 1, "not_a_megatron_field": [1, 2]}),
    ("128-prompts", {"prompts": ["a"] * 128, "tokens_to_generate": 1, "top_k": 1}),
]


@pytest.fixture(scope="module")
def srv():
    return shared_server()


@pytest.mark.parametrize("body,message", [c[1:] for c in REJECT_CASES], ids=[c[0] for c in REJECT_CASES])
def test_rejected_with_megatrons_message(srv, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = call(srv, "PUT", "/api", raw=raw)
    assert status == 400, answer
    assert answer == {"message": message}
    status, health = call(srv, "GET", "/health")
    assert status == 200 and health["status"] == "ok", health


@pytest.mark.parametrize("body", [c[1] for c in ACCEPT_CASES], ids=[c[0] for c in ACCEPT_CASES])
def test_accepted(srv, body):
    status, answer = call(srv, "PUT", "/api", body)
    assert status == 200, answer
    assert len(answer["text"]) == len(body["prompts"])
    assert (answer["logprobs"] is not None) == bool(body.get("logprobs"))


def test_defaults_are_megatrons():
    req = parse_megatron_request({"prompts": ["a"]})
    assert (req.tokens_to_generate, req.logprobs, req.temperature, req.top_k, req.top_p, req.add_BOS,
            req.stop_on_eol, req.stop_on_double_eol, req.random_seed, req.no_log) == (
        64, False, 1.0, 0, 0.0, False, False, False, -1, False)
    assert isinstance(parse_megatron_request({"prompts": ["a"], "top_p": 1}).top_p, float)


def test_every_rule_has_an_http_case():
    """Each field of the table is rejected and accepted by some case above, and each message is expected by one."""
    expected = {m for _, _, m in REJECT_CASES}
    rejected_fields = {k for _, body, _ in REJECT_CASES if isinstance(body, dict) for k in body}
    accepted_fields = {k for _, body in ACCEPT_CASES for k in body}
    for entry in MEGATRON_API_FIELDS:
        if isinstance(entry, ApiRule):
            assert entry.message in expected, entry
            continue
        assert isinstance(entry, ApiField)
        assert entry.type_message in expected, entry.name
        assert all(check.message in expected for check in entry.checks), entry.name
        assert entry.name in rejected_fields, entry.name
        if entry.name != "beam_width":  # refused whatever its value: no beam search here
            assert entry.name in accepted_fields, entry.name
