"""LogitsWorkspace: the fused output layer + loss reuses its [tokens, vocab] buffer only while no graph holds it."""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F

from megatron_hybrid.parallel.cross_entropy import LogitsWorkspace, linear_cross_entropy


def _inputs(seed: int, tokens: int = 12, vocab: int = 40, hidden: int = 8):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    return h, w, target


def _grads(loss, h, w):
    loss.sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    return grads


def test_workspace_is_reused_after_backward_and_gives_equal_results():
    workspace = LogitsWorkspace()
    h, w, target = _inputs(0)
    reference = linear_cross_entropy(h, w, target)
    ref_grads = _grads(reference, h, w)
    for _ in range(2):
        loss = linear_cross_entropy(h, w, target, workspace)
        buffer = workspace._buffer
        assert buffer is not None and buffer._use_count() > 1  # held by the graph until its backward
        assert torch.equal(loss, reference)
        for got, want in zip(_grads(loss, h, w), ref_grads):
            assert torch.equal(got, want)
        assert workspace._buffer is buffer and buffer._use_count() == 1  # released, kept for the next call


def test_workspace_not_reused_while_an_earlier_graph_holds_it():
    """Two forwards before their backwards (and a retained graph) must not share the buffer."""
    workspace = LogitsWorkspace()
    h1, w1, t1 = _inputs(1)
    h2, w2, t2 = _inputs(2)
    want1 = _grads(linear_cross_entropy(h1, w1, t1), h1, w1)
    want2 = _grads(linear_cross_entropy(h2, w2, t2), h2, w2)
    loss1 = linear_cross_entropy(h1, w1, t1, workspace)
    loss2 = linear_cross_entropy(h2, w2, t2, workspace)  # the buffer is loss1's: this one gets its own
    for got, want in zip(_grads(loss2, h2, w2), want2):
        assert torch.equal(got, want)
    loss1.sum().backward(retain_graph=True)
    h1.grad = w1.grad = None
    linear_cross_entropy(h2, w2, t2, workspace).sum().backward()  # retained graph: still not reusable
    h2.grad = w2.grad = None
    for got, want in zip(_grads(loss1, h1, w1), want1):
        assert torch.equal(got, want)


def test_workspace_grows_and_follows_dtype_without_grad():
    workspace = LogitsWorkspace()
    h, w, target = _inputs(3, tokens=4)
    with torch.no_grad():
        linear_cross_entropy(h, w, target, workspace)
        small = workspace._buffer
        big_h, big_w, big_t = _inputs(4, tokens=20)
        loss = linear_cross_entropy(big_h, big_w, big_t, workspace)
        assert workspace._buffer is not small and workspace._buffer.numel() == 20 * 40
        expected = F.cross_entropy(big_h @ big_w.t(), big_t, reduction="none")
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        linear_cross_entropy(h.float(), w.float(), target, workspace)
        assert workspace._buffer.dtype == torch.float32


def test_workspace_copies_and_pickles_empty():
    workspace = LogitsWorkspace()
    h, w, target = _inputs(5)
    with torch.no_grad():
        linear_cross_entropy(h, w, target, workspace)
    for other in (copy.deepcopy(workspace), pickle.loads(pickle.dumps(workspace))):
        assert isinstance(other, LogitsWorkspace) and other._buffer is None
