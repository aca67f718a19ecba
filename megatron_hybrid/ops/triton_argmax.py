"""Greedy tokens of a decode step and the next step's inputs, in two Triton kernels (the end of a replayed graph).

Why it exists: after the output layer a greedy CUDA-graph step took torch's ``max(dim)`` over the 256000 logits of
the 800M model (9 us on an H200: one block per row reduces the whole row), a memset, a copy of the tokens into the
next step's ids and an add on the positions: four launches at the end of a ~0.6 ms step. Here:

* ``_partial_argmax_kernel``, grid ``(rows, PARTS)``: each program finds the maximum of its slice of a row and the
  slice's first index holding it;
* ``_final_argmax_kernel``, grid ``(rows,)``: the first part holding the row's maximum gives the token (so ties go to
  the lowest index, like ``torch.argmax``); it stores the token, writes it as the row's next input id and advances
  the row's position by one.

Both launch with programmatic dependent launch where available (``_triton_common``). NaN logits: the token is
unspecified (torch would return a NaN's index). Importing this module never fails: without triton
``UNAVAILABLE_REASON`` says why and the entry point raises ``KernelUnavailableError``. Under ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = ["UNAVAILABLE_REASON", "greedy_and_feed_triton"]

from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, launch_options, pdl_mode, tl, triton

PARTS = 128  # programs per row in the first pass: about one per SM for a batch-1 step
MIN_PART = 1024  # elements a program reads at least (short rows use fewer parts)

if triton is not None:
    from megatron_hybrid.ops._triton_common import let_next_kernel_launch_early, wait_for_previous_kernel

    @triton.jit
    def _partial_argmax_kernel(
        LOGITS, PART_VAL, PART_IDX, V, stride_row, part_len,
        BLOCK: tl.constexpr, NUM_PARTS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        wait_for_previous_kernel(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        start = part * part_len
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_idx = start + offs  # a row of -inf logits gives its first index, as torch.argmax does
        for k in range(0, part_len, BLOCK):
            idx = start + k + offs
            ok = (idx < V) & (k + offs < part_len)
            x = tl.load(LOGITS + row * stride_row + idx, mask=ok, other=float("-inf")).to(tl.float32)
            better = x > best  # strictly: an earlier index keeps a tie
            best = tl.where(better, x, best)
            best_idx = tl.where(better, idx, best_idx)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
        tl.store(PART_VAL + row * NUM_PARTS + part, top)
        tl.store(PART_IDX + row * NUM_PARTS + part, first)

    @triton.jit
    def _final_argmax_kernel(
        PART_VAL, PART_IDX, TOKENS, IDS, POSITIONS,
        NUM_PARTS: tl.constexpr, PARTS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        wait_for_previous_kernel(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        parts = tl.arange(0, PARTS_PAD)
        ok = parts < NUM_PARTS
        values = tl.load(PART_VAL + row * NUM_PARTS + parts, mask=ok, other=float("-inf"))
        indices = tl.load(PART_IDX + row * NUM_PARTS + parts, mask=ok, other=2147483647)
        top = tl.max(values, axis=0)
        token = tl.min(tl.where(values == top, indices, 2147483647), axis=0).to(tl.int64)
        tl.store(TOKENS + row, token)
        tl.store(IDS + row, token)
        tl.store(POSITIONS + row, tl.load(POSITIONS + row) + 1)


def greedy_and_feed_triton(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The greedy token of every row of ``logits`` [rows, V] (int64 [rows], ties to the lowest index), also written
    into ``ids`` [rows] (int64), with ``positions`` [rows] (int64) advanced by one, in place: the next decode step's
    inputs. Allocates only with ``torch.empty`` and never synchronises (CUDA graphs)."""
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the Triton greedy argmax is unavailable: {UNAVAILABLE_REASON}")
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with a contiguous last dim, got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    for name, tensor in (("ids", ids), ("positions", positions)):
        if tensor.shape != (rows,) or tensor.dtype != torch.long or tensor.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous int64 [{rows}], got {tensor.dtype} {tuple(tensor.shape)}")
    tokens = torch.empty(rows, device=logits.device, dtype=torch.long)
    if rows == 0:
        return tokens
    if vocab == 0:
        raise ValueError("logits have no vocabulary entries")
    parts = max(1, min(PARTS, triton.cdiv(vocab, MIN_PART)))
    part_len = triton.cdiv(vocab, parts)
    block = min(1024, triton.next_power_of_2(part_len))
    part_val = torch.empty(rows * parts, device=logits.device, dtype=torch.float32)
    part_idx = torch.empty(rows * parts, device=logits.device, dtype=torch.int32)
    use_pdl = pdl_mode(logits.device)
    _partial_argmax_kernel[(rows, parts)](
        logits, part_val, part_idx, vocab, logits.stride(0), part_len,
        BLOCK=block, NUM_PARTS=parts, USE_PDL=use_pdl, num_warps=4, **launch_options(use_pdl),
    )
    _final_argmax_kernel[(rows,)](
        part_val, part_idx, tokens, ids, positions,
        NUM_PARTS=parts, PARTS_PAD=triton.next_power_of_2(parts), USE_PDL=use_pdl, num_warps=4,
        **launch_options(use_pdl),
    )
    return tokens
