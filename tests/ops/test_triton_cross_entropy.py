"""Our Triton cross entropy (``ops.triton_cross_entropy``) against the float64 ``F.cross_entropy``, in Triton's CPU
interpreter (``triton_interpreter.py`` says how; a fresh process runs them where this one cannot).

Crossed boundaries: vocabularies of one partial block, of several blocks with a partial last one (the block is
shrunk to 64), and exact multiples; targets at both ends of the vocabulary and outside it; strided rows; -inf logits
(masked entries) and large logits; upstream gradients that vary per token and the stride-0 one of ``.mean()``; the
gradient written over the logits (``reuse_logits``) and a second backward refused then; targets of the wrong shape
or device named in the error. The dispatch off CUDA is
checked in ``test_ops_backend.py`` (it needs no triton).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import (
    fresh_process_test,
    import_interpreted,
    interpret_if_possible,
    interpreted_kernel_modules,
    interpreter_only,
)

from megatron_hybrid.parallel.state import initialize_parallel_groups
from megatron_hybrid.parallel.testing import run_distributed

interpret_if_possible()
triton = pytest.importorskip(
    "triton", reason="triton is not installed: the Triton cross entropy is checked only with it (pip install triton)"
)

needs_interpreter = interpreter_only(triton)
test_in_a_fresh_process = fresh_process_test(triton, __file__)


@pytest.fixture(scope="module")
def tce():
    for module in interpreted_kernel_modules("megatron_hybrid.ops.triton_cross_entropy"):
        saved = module.BLOCK_V
        module.BLOCK_V = 64  # several blocks per row at test sizes: the online max / sum across blocks runs
        yield module
        module.BLOCK_V = saved


def _reference(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor):
    leaf = logits.double().requires_grad_()
    loss = F.cross_entropy(leaf, target, reduction="none")
    loss.backward(grad_loss.double())
    return loss.detach(), leaf.grad


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(rows, vocab + 5, generator=gen) * scale).to(dtype)
    return wide[:, :vocab]  # rows strided (stride vocab + 5), as a view of a wider buffer


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [37, 64, 200])  # one partial block; exactly one block; four blocks, last partial
def test_loss_and_gradient_match_float64(tce, dtype, vocab):
    rows = 6
    logits = _logits(rows, vocab, dtype, seed=vocab)
    target = torch.tensor([0, vocab - 1, 5, vocab // 2, 1, vocab - 2])
    grad_loss = torch.linspace(-1.5, 2.0, rows)
    want_loss, want_grad = _reference(logits, target, grad_loss)

    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy_triton(leaf, target)
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    loss.backward(grad_loss)
    assert (loss.double() - want_loss).abs().max().item() <= 2e-6 * max(1.0, want_loss.abs().max().item())
    assert leaf.grad.dtype == dtype
    if dtype == torch.float32:
        assert (leaf.grad.double() - want_grad).abs().max().item() <= 1e-6
    else:  # the float32 gradient rounded once: within one rounding of the float64 one (2^-8 / 2^-11 relative)
        ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        bound = ulp * want_grad.abs() + 1e-7
        assert ((leaf.grad.double() - want_grad).abs() <= bound).all()


@needs_interpreter
def test_masked_and_large_logits_and_the_mean_of_a_batch(tce):
    rows, vocab = 4, 150
    logits = _logits(rows, vocab, torch.float32, seed=1, scale=1.0)
    logits[0, 70:] = float("-inf")  # a row whose later blocks are all masked out
    logits[1, :] = float("-inf")
    logits[1, 3] = 0.0  # one finite entry (the target): loss 0
    logits[2] *= 2000.0  # exp overflows without the running max
    target = torch.tensor([10, 3, 99, 149])
    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy_triton(leaf, target)
    loss.mean().backward()  # the upstream gradient is an expanded scalar (stride 0)
    want_loss, want_grad = _reference(logits, target, torch.full((rows,), 1.0 / rows))
    assert torch.isfinite(loss).all() and loss[1].item() == 0.0
    assert (loss.double() - want_loss).abs().max().item() <= 2e-6 * want_loss.abs().max().item()
    assert (leaf.grad.double() - want_grad).abs().max().item() <= 1e-6
    assert (leaf.grad[0, 70:] == 0).all()


@needs_interpreter
def test_reuse_logits_writes_the_gradient_over_them_once(tce):
    logits = _logits(5, 130, torch.bfloat16, seed=2)
    target = torch.tensor([1, 2, 3, 4, 129])
    plain = logits.clone().requires_grad_()
    tce.cross_entropy_triton(plain, target).sum().backward()

    source = logits.clone().requires_grad_()
    owned = source * 1  # the model's own logits: a fresh tensor that nothing else reads
    loss = tce.cross_entropy_triton(owned, target, reuse_logits=True)
    loss.sum().backward(retain_graph=True)
    assert torch.equal(source.grad, plain.grad)
    assert torch.equal(owned, plain.grad)  # the buffer now holds the gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@needs_interpreter
def test_an_id_outside_the_vocabulary_gives_a_nan_loss_for_its_token_only(tce):
    logits = _logits(3, 100, torch.float32, seed=3)
    loss = tce.cross_entropy_triton(logits, torch.tensor([5, 100, -1]))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    want, _ = _reference(logits[:1], torch.tensor([5]), torch.ones(1))
    assert abs(loss[0].item() - want.item()) <= 1e-5


@needs_interpreter
def test_bad_targets_are_named(tce):
    logits = torch.randn(4, 3, 10)
    with pytest.raises(ValueError, match=r"target \(4,\) must be logits \(4, 3, 10\) without the last dim"):
        tce.cross_entropy_triton(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="must share a device"):
        tce.cross_entropy_triton(logits, torch.zeros(4, 3, dtype=torch.long, device="meta"))


def _vocab_parallel_worker(rank: int, world_size: int) -> list[str]:
    """One rank of a vocab-parallel run: its slice of each case's logits through the kernels (interpreted: this process
    imports the module afresh) against the float64 loss and the matching slice of the float64 gradient. Returns what
    failed."""
    groups = initialize_parallel_groups(tp=world_size)
    module = import_interpreted("megatron_hybrid.ops.triton_cross_entropy")
    module.BLOCK_V = 64  # two blocks per slice row, the last partial
    rows, local_vocab = 6, 90
    vocab = local_vocab * world_size
    part = slice(rank * local_vocab, (rank + 1) * local_vocab)
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        for reuse in (False, True):
            logits = _logits(rows, vocab, dtype, seed=11)
            logits[4] *= 500.0  # a slice's exp(logsumexp) overflows float32 unless shifted by the max over slices
            target = torch.tensor([0, local_vocab - 1, local_vocab, vocab - 1, 45, vocab // 2 + 7])  # slice ends
            grad_loss = torch.linspace(-1.5, 2.0, rows)
            want_loss, want_grad = _reference(logits, target, grad_loss)
            leaf = logits[:, part].clone().requires_grad_()
            loss = module.cross_entropy_triton(leaf * 1 if reuse else leaf, target, reuse_logits=reuse,
                                               group=groups.tp)
            loss.backward(grad_loss)
            case = f"rank {rank} {dtype} reuse={reuse}"
            if (loss.double() - want_loss).abs().max().item() > 2e-6 * max(1.0, want_loss.abs().max().item()):
                failures.append(f"{case}: loss {loss.tolist()} != {want_loss.tolist()}")
            want = want_grad[:, part]
            ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
            if not ((leaf.grad.double() - want).abs() <= ulp * want.abs() + 1e-6).all():
                failures.append(f"{case}: gradient off by {(leaf.grad.double() - want).abs().max().item():.3g}")
    outside = module.cross_entropy_triton(_logits(3, vocab, torch.float32, seed=12)[:, part],
                                          torch.tensor([5, vocab, -1]), group=groups.tp)
    if not (torch.isfinite(outside[0]) and torch.isnan(outside[1:]).all()):
        failures.append(f"rank {rank}: ids outside the vocabulary gave {outside.tolist()}, not NaN")
    return failures


@needs_interpreter
def test_vocab_parallel_slices_match_the_whole_vocabulary():
    """Two gloo ranks, each with half of the vocabulary: every rank's loss is the whole row's, and its gradient is its
    slice of the whole gradient (targets on the first and last id of each slice, in either half)."""
    failures = [f for rank in run_distributed(_vocab_parallel_worker, 2, timeout=180) for f in rank]
    assert not failures, "\n".join(failures)
