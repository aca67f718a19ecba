"""CUDA graphs of the hybrid layers for training (``--enable-cuda-graph``).

A layer's forward and backward each become one graph replay instead of tens of kernel launches issued one by one from
Python (a Mamba layer's forward+backward at the 800M shape issues ~15 Triton launches, 6 GEMMs and ~30 torch ops:
3-4 ms of CPU time for 3.5 ms of GPU work, so a layer alone is bound by the host). The graphs are captured with
``torch.cuda.make_graphed_callables``, one per layer, sharing one memory pool, at the first training forward that
qualifies (so the shapes, dtypes and autocast state are the real ones); every later call with the same signature
replays them, and anything else (evaluation, inference, another shape) runs the layers eagerly.

What a replay assumes, and why the conditions below hold it:
- static shapes and dtypes: the captured signature (hidden states, ``seq_idx`` and ``position_ids`` shapes and
  dtypes, autocast dtype) is compared on every call;
- one forward in flight: a replay overwrites the previous forward's outputs and saved activations, so each forward
  must be followed by its backward before the next forward, which is what gradient accumulation without a pipeline
  does (pipeline parallelism keeps several micro-batches in flight and is refused);
- no collectives inside the layers: tensor (and sequence) parallelism is refused; data parallelism reduces gradients
  after the backward, outside the graphs;
- parameters updated in place (the optimizer does), never reallocated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LayerGraphs", "enable_layer_graphs"]


class _PositionalLayer(nn.Module):
    """A layer called with positional tensors only (what ``make_graphed_callables`` passes): ``(hidden, *extras)``
    where ``extras`` are the non-None tensors among ``seq_idx`` and ``position_ids``, named by ``extra_names``. Its
    parameters are the layer's (the graphed backward returns their gradients)."""

    def __init__(self, layer: nn.Module, extra_names: tuple[str, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.extra_names = extra_names

    def forward(self, hidden_states: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, **dict(zip(self.extra_names, extras)))


def _signature(hidden_states: torch.Tensor, seq_idx: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> tuple:
    def describe(tensor: torch.Tensor | None) -> tuple | None:
        if tensor is None:
            return None
        return tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad

    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return describe(hidden_states), describe(seq_idx), describe(position_ids), autocast


class LayerGraphs:
    """CUDA graphs of a sequence of layers, captured at the first call (see the module docstring).

    ``layers`` run in the order given, each taking and returning ``[s, b, h]`` hidden states.
    """

    def __init__(self, layers: Sequence[nn.Module], num_warmup_iters: int = 3) -> None:
        if not layers:
            raise ValueError("LayerGraphs needs at least one layer")
        self.layers = list(layers)
        self.num_warmup_iters = num_warmup_iters
        self.signature: tuple | None = None
        self._graphed: tuple[nn.Module, ...] = ()
        self._layer_params = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        self._warned_eager = False

    @property
    def captured(self) -> bool:
        return self.signature is not None

    def applies(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> bool:
        """Whether this call may use the graphs (capturing them if none are yet): a training-mode forward on CUDA
        that records gradients, with the captured signature. Warns once when a training call falls back to eager."""
        if not (hidden_states.is_cuda and torch.is_grad_enabled() and all(layer.training for layer in self.layers)):
            return False
        signature = _signature(hidden_states, seq_idx, position_ids)
        if self.signature is None:
            self._capture(hidden_states, seq_idx, position_ids, signature)
            return True
        if signature == self.signature:
            return True
        if not self._warned_eager:
            self._warned_eager = True
            warnings.warn(f"CUDA graphs were captured for {self.signature}; a training forward with {signature} "
                          "runs the layers eagerly (slower)", stacklevel=3)
        return False

    def __call__(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the layers (after :meth:`applies` returned True for these arguments)."""
        self._give_parameters_gradients()
        extras = tuple(t for t in (seq_idx, position_ids) if t is not None)
        for graphed in self._graphed:
            hidden_states = graphed(hidden_states, *extras)
        return hidden_states

    def _give_parameters_gradients(self) -> None:
        """Zero ``.grad`` tensors (views of one buffer per dtype) for the layers' parameters that have none.

        Why: a graph's backward returns the parameters' gradients as views of its static buffers, and autograd, finding
        ``.grad`` empty, would keep such a view as ``.grad`` itself; the next micro-batch's replay then overwrites it
        before adding to it (twice the second micro-batch's gradient instead of the sum). With ``.grad`` present every
        micro-batch is added into it, as in an eager run."""
        missing: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in self._layer_params:
            if param.grad is None:
                missing.setdefault(param.dtype, []).append(param)
        for dtype, params in missing.items():
            flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            offset = 0
            for param in params:
                param.grad = flat[offset: offset + param.numel()].view_as(param)
                offset += param.numel()

    def _capture(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None,
                 position_ids: torch.Tensor | None, signature: tuple) -> None:
        names = tuple(name for name, t in (("seq_idx", seq_idx), ("position_ids", position_ids)) if t is not None)
        extras = tuple(t.detach().clone() for t in (seq_idx, position_ids) if t is not None)
        wrapped = tuple(_PositionalLayer(layer, names) for layer in self.layers)
        # Every layer's sample input is a fresh tensor like this call's hidden states; a layer must return what it
        # takes (checked below), so each sample also stands for the previous layer's output.
        samples = tuple(
            (torch.empty_like(hidden_states).normal_().requires_grad_(hidden_states.requires_grad), *extras)
            for _ in wrapped
        )
        autocast = signature[3]
        # make_graphed_callables refuses autocast's weight-cast cache (a cached cast would be captured once and never
        # refreshed after the optimizer step); the casts then run inside the graphs, as eager autocast does them for
        # every forward anyway.
        with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None,
                            cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(wrapped, samples, num_warmup_iters=self.num_warmup_iters)
        for index, module in enumerate(graphed):
            out = module(samples[index][0], *extras)  # a replay: checks the output signature, warms the copy path
            if out.shape != hidden_states.shape or out.dtype != hidden_states.dtype:
                raise RuntimeError(f"layer {index} returns {tuple(out.shape)} {out.dtype} for "
                                   f"{tuple(hidden_states.shape)} {hidden_states.dtype}: CUDA graphs of a layer chain "
                                   "need each layer to return what it takes")
        self._graphed = tuple(graphed)
        self.signature = signature


def enable_layer_graphs(model: nn.Module) -> LayerGraphs:
    """Run ``model``'s hybrid layers (its ``decoder``, a :class:`~megatron_hybrid.models.MambaStack`) as CUDA graphs
    in training (captured at the first qualifying forward). Refuses a model whose layers talk to other ranks
    (tensor or pipeline parallelism) or that is not on a CUDA device."""
    groups = getattr(model, "groups", None)
    if groups is not None and (groups.tp_size > 1 or groups.pp_size > 1):
        raise ValueError("CUDA graphs of the layers need tensor- and pipeline-parallel size 1 (got tp="
                         f"{groups.tp_size}, pp={groups.pp_size}): collectives inside a layer and several "
                         "micro-batches in flight are not captured here")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
    stack = model.decoder
    graphs = LayerGraphs(list(stack.layers.values()))
    stack.layer_graphs = graphs
    return graphs
