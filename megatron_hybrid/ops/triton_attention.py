"""Single-token decode attention with the KV-cache write fused in, as one Triton kernel (two for long caches).

Why it exists: the layers' decode attention (``layers.attention.decode_attention`` after a scatter into the cache)
is about a dozen small kernels per attention layer (two scatters, the q reshape copy, the score matmul, its float
cast and scaling, an arange, the mask compare and fill, softmax, the cast back, the value matmul, the context
reshape copy), each a launch on a step that is bound by launches. Here, per (row, key-value head[, key split]) one
program:

* loads the row's query heads of that group ``q [heads_per_group, d]`` and the new key and value ``[d]`` straight
  from where they are (strided views of ``linear_qkv``'s output: no split or reshape copies);
* runs an online softmax over the cached keys ``0 .. pos - 1`` of its range (``pos`` = the row's position, read from
  device memory, so a CUDA graph replays it for any lengths and only ``pos + 1`` keys are read, never the whole
  cache) plus the new key at ``pos``, which is taken from registers, not from the cache;
* writes the new key and value into the cache at ``pos`` (the only program that covers ``pos`` does; no program
  reads that entry, so there is no race);
* stores the context in the ``[b, heads * d]`` layout ``linear_proj`` reads (head ``g * heads_per_group + i``).

Caches longer than ``KEYS_PER_SPLIT``, and shorter ones when few (row, head) programs would run (batch 1), are split
over ``S`` programs per head (flash-decoding): each stores its unnormalised partial output, running max and sum in
float32, and ``_combine_kernel`` merges them. ``S`` is static (from ``attention_length`` and the batch); splits that
start beyond a row's position exit without reading anything.

Numerics: scores, softmax and the weighted sum run in float32 from the cache dtype, the output is rounded once to the
query's dtype (the unfused path rounds the scores and the probabilities to bfloat16 on the way; this is closer to the
float64 result, not bit-identical to it). Scale ``head_dim ** -0.5`` like ``decode_attention`` and SDPA's default.

Importing this module never fails: without triton ``UNAVAILABLE_REASON`` says why and the entry point raises
``KernelUnavailableError``. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

from megatron_hybrid.ops.mamba_ssm_loader import KernelUnavailableError

__all__ = ["UNAVAILABLE_REASON", "decode_attention_triton"]

from megatron_hybrid.ops._triton_common import ROUND_KIND as _ROUND_KIND
from megatron_hybrid.ops._triton_common import UNAVAILABLE_REASON, launch_options, pdl_mode, tl, triton

# Module globals, read at every call, so a benchmark can sweep them. A split of at most 512 keys; and when the
# (row, kv head) programs would leave most SMs idle (a batch-1 step of the 800M model has 8), more splits, down to
# MIN_KEYS_PER_SPLIT keys each, to reach TARGET_PROGRAMS: on an H200 the batch-1 attention took 14.7 us with 8
# programs over ~256 cached keys, a third of the four layers' share of a 0.66 ms engine step.
KEYS_PER_SPLIT = 512
MIN_KEYS_PER_SPLIT = 64
TARGET_PROGRAMS = 128  # about one per SM of an H100 / H200
MAX_SPLITS = 32
BLOCK_KEYS = 64  # at most; fewer for wide groups (PRODUCT_ELEMENTS)
PRODUCT_ELEMENTS = 8192
ATTENTION_WARPS = 4

if triton is not None:
    from megatron_hybrid.ops._triton_common import let_next_kernel_launch_early, wait_for_previous_kernel
    from megatron_hybrid.ops._triton_common import round_to_storage as _round


    @triton.jit
    def _decode_attention_kernel(
        Q, K_NEW, V_NEW, K_CACHE, V_CACHE, POS, OUT, PART_O, PART_ML,
        scale,
        stride_q_b, stride_q_g, stride_q_h,
        stride_kn_b, stride_kn_g, stride_vn_b, stride_vn_g,
        stride_kc_b, stride_kc_g, stride_kc_l, stride_vc_b, stride_vc_g, stride_vc_l,
        stride_o_b,
        HEADS: tl.constexpr, HPG: tl.constexpr, HPG_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        KEYS_PER_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_L: tl.constexpr,
        CACHE_ROUND: tl.constexpr, OUT_ROUND: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        wait_for_previous_kernel(USE_PDL)  # q, k, v come from the previous kernel; nothing to load before
        pid_b = tl.program_id(0).to(tl.int64)
        pid_g = tl.program_id(1)
        pid_s = tl.program_id(2)
        pos = tl.load(POS + pid_b).to(tl.int32)
        start = pid_s * KEYS_PER_SPLIT
        # Keys [start, end) are this split's; key pos is the new one. The last split runs to pos whatever the split
        # size, so a position beyond attention_length is still attended to in full (only slower).
        end = tl.where(pid_s == NUM_SPLITS - 1, pos + 1, tl.minimum(start + KEYS_PER_SPLIT, pos + 1))
        cached_end = tl.minimum(end, pos)

        heads = tl.arange(0, HPG_PAD)
        dims = tl.arange(0, DIM_PAD)
        mask_h = heads < HPG
        mask_d = dims < DIM
        q = tl.load(
            Q + pid_b * stride_q_b + pid_g * stride_q_g + heads[:, None] * stride_q_h + dims[None, :],
            mask=mask_h[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32) * scale
        k_new = tl.load(K_NEW + pid_b * stride_kn_b + pid_g * stride_kn_g + dims, mask=mask_d, other=0.0)
        v_new = tl.load(V_NEW + pid_b * stride_vn_b + pid_g * stride_vn_g + dims, mask=mask_d, other=0.0)
        # The cache holds the new key in its own dtype; attend to exactly that value, as a later step will read it.
        k_new_f = _round(k_new.to(tl.float32), CACHE_ROUND)
        v_new_f = _round(v_new.to(tl.float32), CACHE_ROUND)

        m = tl.full([HPG_PAD], float("-inf"), tl.float32)
        l = tl.zeros([HPG_PAD], tl.float32)
        acc = tl.zeros([HPG_PAD, DIM_PAD], tl.float32)
        k_base = K_CACHE + pid_b * stride_kc_b + pid_g * stride_kc_g
        v_base = V_CACHE + pid_b * stride_vc_b + pid_g * stride_vc_g
        keys = tl.arange(0, BLOCK_L)
        for block in range(start, cached_end, BLOCK_L):
            offs = block + keys
            mask_l = offs < cached_end
            kv_mask = mask_l[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs[:, None] * stride_kc_l + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs[:, None] * stride_vc_l + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [HPG_PAD, BLOCK_L]
            scores = tl.where(mask_l[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            m = m_new

        if (pos >= start) & (pos < end):  # this split holds the new token: attend to it and write it to the cache
            score = tl.sum(q * k_new_f[None, :], axis=1)
            m_new = tl.maximum(m, score)
            alpha = tl.exp(m - m_new)
            p = tl.exp(score - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new_f[None, :]
            m = m_new
            tl.store(k_base + pos * stride_kc_l + dims, k_new_f.to(K_CACHE.dtype.element_ty), mask=mask_d)
            tl.store(v_base + pos * stride_vc_l + dims, v_new_f.to(V_CACHE.dtype.element_ty), mask=mask_d)

        head = pid_g * HPG + heads  # global (this rank's) query head
        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(
                OUT + pid_b * stride_o_b + head[:, None] * DIM + dims[None, :],
                _round(out, OUT_ROUND).to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :],
            )
        else:
            # Partials [b, heads, NUM_SPLITS, DIM] and (max, sum) [b, heads, NUM_SPLITS, 2]; an empty split leaves
            # m = -inf, l = 0, acc = 0, which the combine weighs by exp(-inf) = 0.
            part = (pid_b * HEADS + head) * NUM_SPLITS + pid_s
            tl.store(PART_O + part[:, None] * DIM + dims[None, :], acc, mask=mask_h[:, None] & mask_d[None, :])
            tl.store(PART_ML + part * 2, m, mask=mask_h)
            tl.store(PART_ML + part * 2 + 1, l, mask=mask_h)

    @triton.jit
    def _combine_kernel(
        PART_O, PART_ML, OUT,
        stride_o_b,
        HEADS: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, OUT_ROUND: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        let_next_kernel_launch_early(USE_PDL)
        wait_for_previous_kernel(USE_PDL)
        pid_b = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, DIM_PAD)
        mask_s = splits < NUM_SPLITS
        mask_d = dims < DIM
        part = (pid_b * HEADS + pid_h) * NUM_SPLITS + splits
        m = tl.load(PART_ML + part * 2, mask=mask_s, other=float("-inf"))
        l = tl.load(PART_ML + part * 2 + 1, mask=mask_s, other=0.0)
        o = tl.load(PART_O + part[:, None] * DIM + dims[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        m_all = tl.max(m, axis=0)  # finite: split 0 always holds key 0
        w = tl.exp(m - m_all)
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
        tl.store(OUT + pid_b * stride_o_b + pid_h * DIM + dims, _round(out, OUT_ROUND).to(OUT.dtype.element_ty),
                 mask=mask_d)




def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _floor_pow2(n: int) -> int:
    return 1 << max(n.bit_length() - 1, 0)


def num_splits(attention_length: int, head_programs: int = TARGET_PROGRAMS) -> int:
    """Key splits per head for a cache read of ``attention_length`` positions by ``head_programs`` (rows x kv heads)
    programs per split (1: no combine kernel): one per ``KEYS_PER_SPLIT`` keys, more (splits of at least
    ``MIN_KEYS_PER_SPLIT`` keys) while fewer than ``TARGET_PROGRAMS`` programs would run."""
    by_length = -(-attention_length // KEYS_PER_SPLIT)
    by_occupancy = min(-(-TARGET_PROGRAMS // max(head_programs, 1)), -(-attention_length // MIN_KEYS_PER_SPLIT))
    return max(1, min(MAX_SPLITS, max(by_length, by_occupancy)))


def decode_attention_triton(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    attention_length: int | None = None,
) -> torch.Tensor:
    """One decode step of attention for ``b`` rows; writes the new keys and values into the caches in place.

    ``q`` [b, kv_heads, heads_per_group, d] (query head ``g * heads_per_group + i`` at ``[:, g, i]``; any strides
    with a contiguous last dim, e.g. a view of ``linear_qkv``'s output), ``k_new`` / ``v_new`` [b, kv_heads, d],
    ``k_cache`` / ``v_cache`` [b, kv_heads, L, d] (the rows' cache slots), ``positions`` [b] int (row ``i`` attends to
    keys ``0 .. positions[i]``; its new key and value are stored at ``positions[i]``), ``attention_length`` (default
    L; at least ``max(positions) + 1``) only sizes the key splits. Returns the context [b, heads * d] in q's dtype.
    """
    if UNAVAILABLE_REASON is not None:
        raise KernelUnavailableError(f"the Triton decode attention is unavailable: {UNAVAILABLE_REASON}")
    batch, kv_heads, hpg, dim = q.shape
    length = k_cache.shape[2]
    if k_new.shape != (batch, kv_heads, dim) or v_new.shape != (batch, kv_heads, dim):
        raise ValueError(f"k_new / v_new must be [{batch}, {kv_heads}, {dim}], got {tuple(k_new.shape)} and "
                         f"{tuple(v_new.shape)}")
    if k_cache.shape != (batch, kv_heads, length, dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache / v_cache must be [{batch}, {kv_heads}, L, {dim}], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if positions.shape != (batch,):
        raise ValueError(f"positions must be [{batch}], got {tuple(positions.shape)}")
    for name, tensor in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.dtype not in _ROUND_KIND:
            raise ValueError(f"the Triton decode attention supports float32, bfloat16 and float16, {name} is "
                             f"{tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {tensor.stride()}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    heads = kv_heads * hpg
    out = torch.empty(batch, heads * dim, device=q.device, dtype=q.dtype)
    if batch == 0:
        return out
    read = length if attention_length is None else max(1, min(attention_length, length))
    splits = num_splits(read, batch * kv_heads)
    dim_pad, hpg_pad = _pow2(dim), _pow2(hpg)
    # Keys per loop iteration: the [heads, keys, dim] float32 products stay near 64 registers a thread.
    block_keys = max(16, min(BLOCK_KEYS, _floor_pow2(PRODUCT_ELEMENTS // (hpg_pad * dim_pad))))
    keys_per_split = -(-read // splits)
    keys_per_split = -(-keys_per_split // block_keys) * block_keys
    if splits > 1:
        part_o = torch.empty(batch * heads * splits, dim, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(batch * heads * splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out  # never touched: NUM_SPLITS == 1 compiles the partial stores out
    positions = positions if positions.stride(0) == 1 else positions.contiguous()
    use_pdl = pdl_mode(q.device)
    _decode_attention_kernel[(batch, kv_heads, splits)](
        q, k_new, v_new, k_cache, v_cache, positions, out, part_o, part_ml,
        float(dim) ** -0.5,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0),
        HEADS=heads, HPG=hpg, HPG_PAD=hpg_pad, DIM=dim, DIM_PAD=dim_pad,
        KEYS_PER_SPLIT=keys_per_split, NUM_SPLITS=splits, BLOCK_L=block_keys,
        CACHE_ROUND=_ROUND_KIND[k_cache.dtype], OUT_ROUND=_ROUND_KIND[out.dtype], USE_PDL=use_pdl,
        num_warps=ATTENTION_WARPS, **launch_options(use_pdl),
    )
    if splits > 1:
        _combine_kernel[(batch, heads)](
            part_o, part_ml, out,
            out.stride(0),
            HEADS=heads, DIM=dim, DIM_PAD=dim_pad, NUM_SPLITS=splits, SPLITS_PAD=_pow2(splits),
            OUT_ROUND=_ROUND_KIND[out.dtype], USE_PDL=use_pdl, **launch_options(use_pdl),
        )
    return out
