"""The inference cache of a model and the description of the forward pass that is about to use it.

Layout: a fixed number of *slots* (``max_batch_size``), one per sequence being generated. Per Mamba layer a conv state
``[slots, conv_dim_local, d_conv]`` and an SSM state ``[slots, nheads_local, headdim, d_state]``; per attention layer
a key and a value cache ``[slots, kv_heads_local, max_sequence_length, head_dim]``. Everything is allocated once, so
decoding allocates no cache memory and CUDA graphs can capture the cache tensors as static buffers.

Two kinds of forward use it (the layers read ``is_decode`` and ask for their cache views):

* prefill (``set_prefill(slot, batch_size)``): prompts of ONE length into the empty slots ``slot ..
  slot + batch_size - 1``, from empty states. Prompts are never padded (prompts of different lengths are separate
  prefills), so no padding can leak into a Mamba state or a conv window.
* decode (``set_decode(batch_size, ...)``): one new token for each of the slots ``0 .. batch_size - 1``, the token of
  slot ``i`` sitting at position ``positions[i]`` (its number of cached tokens). The engine keeps its live sequences in
  the leading slots (a finished sequence's slot is refilled by moving the last one into it, ``move_slot``), so a decode
  step works on contiguous leading views of every cache, updated in place.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.mamba_mixer import MambaMixer


class InferenceContext:
    """Per-layer caches of ``model`` (this rank's shards under tensor parallelism) plus the current forward's mode.

    ``model`` is walked for its Mamba mixers and attention modules (their ``allocate_inference_cache`` says what they
    need); caches are keyed by the global layer number. ``dtype`` (default: each module's weight dtype)
    applies to the conv states and the KV cache; ``ssm_state_dtype`` to the SSM states (float32 by default).
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int,
        max_sequence_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) and max_sequence_length ({max_sequence_length}) must be >= 1"
            )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.mamba: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in model.modules():
            if not isinstance(module, (MambaMixer, SelfAttention)):
                continue
            layer = module.layer_number
            if layer in self.mamba or layer in self.kv:
                raise ValueError(f"two cached modules claim layer number {layer}")
            if isinstance(module, MambaMixer):
                self.mamba[layer] = module.allocate_inference_cache(
                    max_batch_size, device=device, dtype=dtype, ssm_state_dtype=ssm_state_dtype
                )
            else:
                self.kv[layer] = module.allocate_inference_cache(
                    max_batch_size, max_sequence_length, device=device, dtype=dtype
                )
        first = next(iter(self.mamba.values() or self.kv.values()), None)
        if device is None:
            device = first[0].device if first is not None else next(model.parameters()).device
        self.device = torch.device(device)
        # A decode step's inputs, static for CUDA graphs: row 0 the token id of each slot (``ModelRunner`` feeds the
        # model from it), row 1 each slot's position (= tokens already cached). One tensor, so a step uploads both
        # with one host-to-device copy.
        self.decode_inputs = torch.zeros(2, max_batch_size, dtype=torch.long, device=self.device)
        self.positions = self.decode_inputs[1]
        self.is_decode = False
        self.batch_size = 1
        self.attention_length = max_sequence_length
        self.last_token_logits_only = True
        self._rows = slice(0, 1)

    # ------------------------------------------------------------------------------------------------ forward modes

    def set_prefill(self, slot: int, batch_size: int = 1, *, last_token_logits_only: bool = True) -> None:
        """The next forward is ``batch_size`` equally long prompts for slots ``slot ..`` (from empty states)."""
        if batch_size < 1 or not 0 <= slot <= self.max_batch_size - batch_size:
            raise ValueError(f"slots [{slot}, {slot + batch_size}) out of range [0, {self.max_batch_size})")
        self.is_decode = False
        self.batch_size = batch_size
        self.last_token_logits_only = last_token_logits_only
        self._rows = slice(slot, slot + batch_size)

    def set_decode(self, batch_size: int, attention_length: int | None = None) -> None:
        """The next forward is one token for each of the slots ``0 .. batch_size - 1`` at ``positions[:batch_size]``.

        ``attention_length``: how many cache positions attention reads (at least ``max(positions) + 1``); the
        default, the whole cache, is what a CUDA graph captures since it cannot depend on the batch's lengths.
        """
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"decode batch {batch_size} out of range [1, {self.max_batch_size}]")
        self.is_decode = True
        self.batch_size = batch_size
        self.attention_length = self.max_sequence_length if attention_length is None else attention_length
        self.last_token_logits_only = True
        self._rows = slice(0, batch_size)

    # ------------------------------------------------------------------------------------------------ layer access

    def mamba_states(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state, ssm_state) views of the current forward's rows for Mamba layer ``layer_number``."""
        conv_state, ssm_state = self.mamba[layer_number]
        return conv_state[self._rows], ssm_state[self._rows]

    def kv_cache(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) cache views of the current forward's rows for attention layer ``layer_number``."""
        keys, values = self.kv[layer_number]
        return keys[self._rows], values[self._rows]

    def decode_positions(self) -> torch.Tensor:
        """Positions [b] of the tokens of the current decode step."""
        return self.positions[self._rows]

    # ------------------------------------------------------------------------------------------------ slot management

    def move_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy every cache of slot ``src`` into slot ``dst`` (only the first ``length`` KV positions if given)."""
        if src == dst:
            return
        for conv_state, ssm_state in self.mamba.values():
            conv_state[dst].copy_(conv_state[src])
            ssm_state[dst].copy_(ssm_state[src])
        for keys, values in self.kv.values():
            end = self.max_sequence_length if length is None else length
            keys[dst, :, :end].copy_(keys[src, :, :end])
            values[dst, :, :end].copy_(values[src, :, :end])
        self.positions[dst] = self.positions[src]

    def reset(self) -> None:
        """Zero every cache (in place: captured CUDA graphs keep pointing at the same memory)."""
        for tensors in (*self.mamba.values(), *self.kv.values()):
            for tensor in tensors:
                tensor.zero_()
        self.decode_inputs.zero_()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held on this rank by each kind of cache, their total, and the total per slot (one sequence)."""

        def size(pairs: dict[int, tuple[torch.Tensor, torch.Tensor]], index: int) -> int:
            return sum(pair[index].numel() * pair[index].element_size() for pair in pairs.values())

        report = {
            "mamba_conv_state": size(self.mamba, 0),
            "mamba_ssm_state": size(self.mamba, 1),
            "attention_kv": size(self.kv, 0) + size(self.kv, 1),
        }
        report["total"] = sum(report.values())
        report["per_sequence"] = report["total"] // self.max_batch_size
        return report
