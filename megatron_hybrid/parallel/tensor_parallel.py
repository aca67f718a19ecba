"""Tensor-parallel linear and embedding layers (Megatron's column/row split, plain PyTorch modules).

Conventions shared by every layer here:

* activations are ``[seq, batch, hidden]`` (sequence first), so sequence parallelism splits dim 0;
* ``in_features`` / ``out_features`` / ``num_embeddings`` are FULL sizes; parameters hold this rank's shard and carry
  ``tp_dim`` / ``tp_components`` (see :mod:`megatron_hybrid.parallel.sharding`);
* initialisation is rank-independent: ``init_method`` fills the FULL weight in float32 on the CPU, drawing from the
  global CPU generator identically on every rank, and each rank keeps its shard. A model built under the same seed at
  any TP size therefore holds exactly the TP=1 weights (Megatron's ``use_cpu_initialization``). The price is one
  full-size float32 temporary per layer during construction. On the ``meta`` device nothing is initialised; call
  ``reset_parameters()`` after materialising;
* replicated parameters whose gradient is only a partial sum under sequence parallelism (the row-parallel bias) carry
  ``param.sequence_parallel = True``: the trainer must all-reduce their gradients over the tensor-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.ops import skinny_gemv
from megatron_hybrid.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tp,
)
from megatron_hybrid.parallel.sharding import (
    check_tp_components,
    set_tensor_parallel_attributes,
    shard_tensor,
    unshard_tensors,
)
from megatron_hybrid.parallel.state import ParallelGroups

__all__ = ["ColumnParallelLinear", "InitMethod", "RowParallelLinear", "VocabParallelEmbedding", "default_init_method"]

InitMethod = Callable[[torch.Tensor], object]
"""Fills a FULL-size float32 CPU tensor in place (e.g. ``functools.partial(nn.init.normal_, std=0.02)``)."""

DEFAULT_INIT_STD = 0.02

SKINNY_GEMV_ENABLED = True
"""Decode's linears (<= ``SKINNY_GEMV_MAX_ROWS`` rows, inference, CUDA) run the Triton GEMV ``ops.skinny_gemv``
instead of cuBLAS, which picks slow kernels for these shapes. A switch so benchmarks can time before / after;
``MEGATRON_HYBRID_KERNELS=torch`` turns it off too."""
SKINNY_GEMV_MAX_ROWS = 1  # measured on an H200: the one-row kernel beats cuBLAS 1.2-3.1x; the tl.dot path for 2-16
# rows lost (0.55-0.83x), so batches of several rows stay on cuBLAS until that path is tuned
_SKINNY_GEMV_DEVICES = ("cuda",)  # a module global so CPU tests can exercise the rules (with an interpreted kernel)


def default_init_method(tensor: torch.Tensor) -> torch.Tensor:
    """Megatron's default: normal(0, 0.02)."""
    return nn.init.normal_(tensor, mean=0.0, std=DEFAULT_INIT_STD)


def _use_skinny_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` should try the Triton GEMV: switch on, a GPU tensor, inference (no autograd through
    the kernel, which has no backward), at most ``SKINNY_GEMV_MAX_ROWS`` rows, a contiguous weight of x's dtype.
    ``ops.skinny_gemv`` still declines (None) when the kernel cannot load or the env forces torch."""
    if not SKINNY_GEMV_ENABLED or x.device.type not in _SKINNY_GEMV_DEVICES or weight.device != x.device:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if x.dim() == 0 or x.shape[-1] == 0 or x.dtype != weight.dtype or not weight.is_contiguous():
        return False
    rows = x.numel() // x.shape[-1]
    return 1 <= rows <= SKINNY_GEMV_MAX_ROWS


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the Triton GEMV for decode-sized inputs (``_use_skinny_gemv``); same result up to rounding."""
    if _use_skinny_gemv(x, weight):
        y = skinny_gemv(x, weight, bias)
        if y is not None:
            return y
    return F.linear(x, weight, bias)


@torch.no_grad()
def _init_sharded(
    param: torch.Tensor, full_shape: tuple[int, ...], init_method: InitMethod, rank: int, size: int
) -> None:
    if param.is_meta:
        return
    full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(full)
    param.copy_(shard_tensor(full, param.tp_dim, param.tp_components, rank, size))


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A``'s output rows split across tensor-parallel ranks.

    Input ``[s, b, in_features]`` (``[s/tp, b, in_features]`` with ``sequence_parallel``: it is all-gathered along the
    sequence first). Output ``[s, b, out_features/tp]``, this rank's slice of every component, or the full
    ``[s, b, out_features]`` in TP=1 order with ``gather_output``. ``tp_components`` lists the full sizes of fused
    outputs that must be split separately (e.g. Mamba ``in_proj``: ``[d_inner, d_inner, ng*ds, ng*ds, nheads]``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: ParallelGroups,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        tp_components: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.init_method = init_method or default_init_method
        tp = groups.tp_size
        self.tp_components = check_tp_components(out_features, tp_components, tp, type(self).__name__)
        self.out_features_per_rank = out_features // tp
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self.out_features_per_rank, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features_per_rank, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _mark_parameters(self) -> None:
        set_tensor_parallel_attributes(self.weight, 0, self.tp_components)
        if self.bias is not None:
            set_tensor_parallel_attributes(self.bias, 0, self.tp_components)

    def reset_parameters(self) -> None:
        """(Re-)initialise deterministically: same values at every TP size for the same global RNG state.

        Also (re-)attaches ``tp_dim`` / ``tp_components``, which ``Module.to_empty()`` drops with the old Parameters.
        """
        self._mark_parameters()
        g = self.groups
        _init_sharded(self.weight, (self.out_features, self.in_features), self.init_method, g.tp_rank, g.tp_size)
        if self.bias is not None and not self.bias.is_meta:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp_group = self.groups.tp
        if self.sequence_parallel:
            x = gather_from_sequence_parallel(x, tp_group)
        else:
            x = copy_to_tp(x, tp_group)
        y = _linear(x, self.weight, self.bias)
        if self.gather_output and self.groups.tp_size > 1:
            y = gather_from_tp(y, tp_group)
            if len(self.tp_components) > 1:  # rank-major -> component-major (the TP=1 order)
                y = unshard_tensors(y.chunk(self.groups.tp_size, dim=-1), y.dim() - 1, self.tp_components)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_per_rank}), bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}, tp_components={self.tp_components}"
        )


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A``'s input columns split across tensor-parallel ranks.

    Input ``[s, b, in_features/tp]`` (``input_is_parallel``, the usual case after a column-parallel layer) or the full
    ``[s, b, in_features]`` which is then split. The partial products are all-reduced into ``[s, b, out_features]``,
    or reduce-scattered along the sequence into ``[s/tp, b, out_features]`` with ``sequence_parallel``. The bias is
    replicated and added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: ParallelGroups,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel=True requires input_is_parallel=True")
        self.groups = groups
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.init_method = init_method or default_init_method
        tp = groups.tp_size
        check_tp_components(in_features, None, tp, type(self).__name__)
        self.in_features_per_rank = in_features // tp
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _mark_parameters(self) -> None:
        set_tensor_parallel_attributes(self.weight, 1, [self.in_features])
        if self.bias is not None:
            # Under sequence parallelism each rank only sees its own tokens, so this gradient is a partial sum.
            self.bias.sequence_parallel = self.sequence_parallel

    def reset_parameters(self) -> None:
        """(Re-)initialise deterministically: same values at every TP size for the same global RNG state.

        Also (re-)attaches the parameter attributes, which ``Module.to_empty()`` drops with the old Parameters.
        """
        self._mark_parameters()
        g = self.groups
        _init_sharded(self.weight, (self.out_features, self.in_features), self.init_method, g.tp_rank, g.tp_size)
        if self.bias is not None and not self.bias.is_meta:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp_group = self.groups.tp
        if not self.input_is_parallel:
            x = scatter_to_tp(x, tp_group)
        y = _linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(y, tp_group)
        else:
            y = reduce_from_tp(y, tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.in_features_per_rank}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary (rows) split across tensor-parallel ranks.

    ``num_embeddings`` is the full (already padded) vocabulary and must divide by the TP size; rank ``r`` owns ids
    ``[r * V/tp, (r+1) * V/tp)``. Each rank looks up the ids it owns (zeros elsewhere) and the partial results are
    summed over the group.

    Layout (Megatron's): input ids ``[b, s]`` (batch first, as tokenizers and data loaders produce them) give
    ``[b, s, h]``; the model transposes to the sequence-first ``[s, b, h]`` of every other activation. With
    ``reduce_scatter_embeddings`` (sequence parallelism: a reduce-scatter along the sequence replaces the all-reduce)
    the output is already sequence-first and sequence-split, ``[s/tp, b, h]``; the transpose is then done on the
    integer ids, which costs nothing.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        groups: ParallelGroups,
        init_method: InitMethod | None = None,
        reduce_scatter_embeddings: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        tp = groups.tp_size
        if num_embeddings % tp != 0:
            raise ValueError(
                f"num_embeddings {num_embeddings} is not divisible by the tensor-parallel size {tp}; pad the vocabulary"
            )
        self.groups = groups
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.init_method = init_method or default_init_method
        self.num_embeddings_per_rank = num_embeddings // tp
        self.vocab_start = groups.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = self.vocab_start + self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise deterministically: same values at every TP size for the same global RNG state.

        Also (re-)attaches ``tp_dim`` / ``tp_components``, which ``Module.to_empty()`` drops with the old Parameters.
        """
        set_tensor_parallel_attributes(self.weight, 0, [self.num_embeddings])
        g = self.groups
        _init_sharded(self.weight, (self.num_embeddings, self.embedding_dim), self.init_method, g.tp_rank, g.tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, s, h]``, or ``[s/tp, b, h]`` with ``reduce_scatter_embeddings``."""
        ids = input_ids
        if self.reduce_scatter_embeddings:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            ids = input_ids.t()  # [s, b]: sequence-first output without transposing activations
        if self.groups.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel(partial, self.groups.tp)
        return reduce_from_tp(partial, self.groups.tp)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (local {self.num_embeddings_per_rank}), {self.embedding_dim}, "
            f"reduce_scatter_embeddings={self.reduce_scatter_embeddings}"
        )
