"""Choosing the next token: sampling parameters, logit filters (temperature, top-k, top-p), seeded sampling, and the
incremental detokenizer that finds stop strings.

Semantics (Megatron-LM's text generation, so its server's answers can be reproduced):

* ``temperature == 0`` or ``top_k == 1`` is greedy (argmax; ties go to the lowest id, like ``torch.argmax``).
* otherwise logits are divided by the temperature, then top-k keeps the logits ``>=`` the k-th largest (ties at the
  boundary survive), then top-p keeps, in descending order, every token whose preceding cumulative probability is
  ``<= top_p`` (the smallest prefix reaching ``top_p``, the token crossing it included). ``top_p`` 0 or 1 is off.
  Megatron refuses top-k and top-p together; here both may be set and apply in that order (the server validates).
* each request samples from its own ``torch.Generator``: seeded when ``seed`` is given, so a request's tokens depend
  only on its seed and its logits, never on which other requests share the batch.
* log-probabilities are ``log_softmax`` of the RAW model distribution (before temperature, top-k and top-p), as
  Megatron reports them: they score the token under the model, not under the sampling filter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "IncrementalDetokenizer",
    "SamplingParams",
    "filter_logits",
    "greedy_tokens",
    "make_generator",
    "sample_tokens",
    "top_k_mask",
    "top_p_mask",
]


@dataclass
class SamplingParams:
    """How one request generates. ``validate`` checks the values (``InferenceEngine.add_request`` calls it)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0.0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off (Megatron semantics); 1.0 also off
    seed: int | None = None  # per-request generator, reproducible
    stop_token_ids: tuple[int, ...] = ()  # e.g. eod; the stop token is part of token_ids, not of the text
    stop_strings: tuple[str, ...] = ()  # needs the engine's tokenizer; the text ends before the stop string
    logprobs: bool = False  # return the log-prob of every generated token
    prompt_logprobs: bool = False  # log-probs of prompt tokens 1..n-1 (Megatron's /api returns them)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; normalises the stop lists to tuples."""
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 or 1 = off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for token in self.stop_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {token!r}")
        for text in self.stop_strings:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop_strings must be non-empty strings, got {text!r}")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A request's generator on ``device``: seeded with ``seed``, or from OS entropy when no seed is given."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    generator.manual_seed(seed % (2**63))
    return generator


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Boolean [n, V] mask of the entries top-k REMOVES: those below each row's k-th largest logit.

    ``top_k`` [n] int; rows with ``k <= 0`` (or ``k >= V``) remove nothing.
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
    return logits < kth


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean [n, V] mask of the entries top-p (nucleus) REMOVES, Megatron's rule.

    In descending order of probability, a token is removed when the probability mass of the tokens before it already
    exceeds ``top_p``; the most likely token is always kept. ``top_p`` [n] float; rows with ``p <= 0`` or ``p >= 1``
    remove nothing. Entries already at ``-inf`` (e.g. removed by top-k) have zero probability here.
    """
    off = (top_p <= 0.0) | (top_p >= 1.0)
    threshold = torch.where(off, torch.full_like(top_p, float("inf")), top_p)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    before = F.pad(cumulative[:, :-1], (1, 0))  # mass of the tokens ranked before each one
    remove_sorted = before > threshold[:, None]
    return torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, per row; removed entries become ``-inf``. Returns a new tensor."""
    logits = logits / temperature[:, None]
    if bool((top_k > 0).any()):
        logits = logits.masked_fill(top_k_mask(logits, top_k), float("-inf"))
    if bool(((top_p > 0.0) & (top_p < 1.0)).any()):
        logits = logits.masked_fill(top_p_mask(logits, top_p), float("-inf"))
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of every row of ``logits`` [..., V]: argmax over the last dim, in the logits' own dtype.

    Upcasting (bfloat16 -> float32) is exact, so no comparison changes and this equals the argmax of the float32
    logits without materialising them. ``max(dim).indices``: argmax's first-maximum (and NaN) semantics, 3x faster on
    a CPU.
    """
    return logits.max(dim=-1).indices


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    want_logprobs: bool = False,
) -> tuple[list[int], list[float] | None]:
    """Next token of every row of ``logits`` [n, V] under that row's ``params``; returns (tokens, raw log-probs or
    None). Greedy rows need no generator; sampled rows draw from theirs (``torch.multinomial``)."""
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled and not want_logprobs:  # all greedy: no float32 copy of the logits, one device-to-host copy
        return greedy_tokens(logits).tolist(), None
    logits = logits.float()
    if len(sampled) < len(params):
        tokens = greedy_tokens(logits)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if sampled:
        device = logits.device
        rows = torch.tensor(sampled, device=device)
        chosen = [params[row] for row in sampled]
        filtered = filter_logits(
            logits.index_select(0, rows),
            torch.tensor([float(p.temperature) for p in chosen], device=device),
            torch.tensor([p.top_k for p in chosen], device=device),
            torch.tensor([float(p.top_p) for p in chosen], device=device),
        )
        probs = filtered.softmax(dim=-1)
        draws = [torch.multinomial(probs[i], 1, generator=generators[row]) for i, row in enumerate(sampled)]
        tokens = tokens.index_copy(0, rows, torch.cat(draws))
    logprobs = None
    if want_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0].tolist()
    return tokens.tolist(), logprobs


class IncrementalDetokenizer:
    """Text of a growing token sequence, released piece by piece, cut at the first stop string.

    Decoding every new token alone is wrong for most tokenizers (a leading-space marker, or a multi-byte character
    split over tokens, only decodes right in context), and decoding the whole sequence every step is quadratic. So two
    offsets slide over the ids: the text added by the newest tokens is ``decode(ids[prefix:]) minus
    decode(ids[prefix:read])``, both decoded from the same start, so start-of-text effects cancel. While the tail
    decodes to U+FFFD (an incomplete character) nothing is released. A few prompt tokens seed the window so the first
    generated token keeps its leading space.

    Stop strings: after each token the new text (plus the tail that could end a stop string begun earlier) is searched;
    on a match the text is cut just before it and ``stopped`` is set. ``pop_delta`` releases text for streaming but
    holds back a tail that may still turn into a stop string.
    """

    CONTEXT_TOKENS = 4

    def __init__(
        self,
        detokenize: Callable[[list[int]], str],
        prompt_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> None:
        self._detokenize = detokenize
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop_strings = tuple(stop_strings)
        self._longest_stop = max((len(s) for s in self._stop_strings), default=0)
        self.text = ""
        self.stopped = False
        self._released = 0

    def add(self, token_id: int) -> None:
        """Append a generated token (ignored once a stop string was found)."""
        if self.stopped:
            return
        self._ids.append(token_id)
        self._advance(final=False)

    def finish(self) -> None:
        """The sequence ended: take in a tail that is still incomplete (it decodes with U+FFFD)."""
        if not self.stopped and self._read_offset < len(self._ids):
            self._advance(final=True)

    def _advance(self, final: bool) -> None:
        prefix_text = self._detokenize(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._detokenize(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return  # nothing complete yet (e.g. half of a multi-byte character)
        previous_length = len(self.text)
        self.text += full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._stop_strings:
            self._find_stop(previous_length)

    def _find_stop(self, previous_length: int) -> None:
        start = max(0, previous_length - self._longest_stop + 1)
        hits = [index for s in self._stop_strings if (index := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def pop_delta(self, final: bool = False) -> str:
        """Text not released yet. Unless ``final`` (or stopped), a tail that is a prefix of a stop string waits."""
        end = len(self.text)
        if not final and not self.stopped and self._stop_strings:
            for keep in range(min(self._longest_stop - 1, end), 0, -1):
                tail = self.text[end - keep :]
                if any(s.startswith(tail) for s in self._stop_strings):
                    end -= keep
                    break
        end = max(end, self._released)
        delta = self.text[self._released : end]
        self._released = end
        return delta
