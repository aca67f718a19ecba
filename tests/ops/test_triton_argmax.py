"""The greedy argmax + next-step feed (``ops.triton_argmax``) against ``torch.argmax``, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so this module sets it at collection when triton is not
imported yet and no GPU is present (see ``triton_interpreter.py``); otherwise the interpreter tests run in a fresh
subprocess. Skipped without triton.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import (
    fresh_process_test,
    interpret_if_possible,
    interpreted_kernel_modules,
    interpreter_only,
)

interpret_if_possible()
triton = pytest.importorskip("triton", reason="triton is not installed: the Triton argmax is checked only with it")

from megatron_hybrid import ops  # noqa: E402

MODULE = "megatron_hybrid.ops.triton_argmax"
needs_interpreter = interpreter_only(triton)


@pytest.fixture(scope="module")
def targmax():
    yield from interpreted_kernel_modules(MODULE)


test_in_a_fresh_process = fresh_process_test(triton, __file__)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 61), (3, 5000), (2, 130_001)])  # one part; several, uneven; many
def test_tokens_and_feed_match_torch(targmax, dtype, rows, vocab):
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab + 7, generator=generator).to(dtype)[:, :vocab]  # rows strided
    # ties: the maximum at two places of row 0 (the lower index must win, as with torch.argmax)
    top = logits[0].float().max().item() + 1.0
    logits[0, vocab // 3] = logits[0, vocab - 1] = top
    ids = torch.full((rows,), -1, dtype=torch.long)
    positions = torch.arange(rows, dtype=torch.long) * 10
    tokens = targmax.greedy_and_feed_triton(logits, ids, positions)
    want = torch.argmax(logits.float(), dim=-1)
    assert tokens.dtype == torch.long and torch.equal(tokens, want)
    assert tokens[0] == vocab // 3
    assert torch.equal(ids, want) and torch.equal(positions, torch.arange(rows) * 10 + 1)


@needs_interpreter
def test_rows_of_minus_infinity_give_the_first_index(targmax):
    logits = torch.full((2, 3000), float("-inf"))
    logits[1, 2999] = 0.0
    tokens = targmax.greedy_and_feed_triton(logits, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert tokens.tolist() == [0, 2999] == torch.argmax(logits, dim=-1).tolist()


@needs_interpreter
def test_rejects_bad_arguments(targmax):
    logits = torch.randn(2, 10)
    ok = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must be"):
        targmax.greedy_and_feed_triton(logits[0], ok, ok)
    with pytest.raises(ValueError, match="ids must be"):
        targmax.greedy_and_feed_triton(logits, ok.int(), ok)
    with pytest.raises(ValueError, match="positions must be"):
        targmax.greedy_and_feed_triton(logits, ok, torch.zeros(3, dtype=torch.long))


def test_dispatch_on_cpu_is_torch():
    """On CPU tensors ``ops.greedy_tokens_and_feed`` is ``max(dim).indices`` plus the two in-place updates."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ids, positions = torch.zeros(3, dtype=torch.long), torch.tensor([4, 5, 6])
    tokens = ops.greedy_tokens_and_feed(logits, ids, positions)
    assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(ids, tokens)
    assert positions.tolist() == [5, 6, 7]
