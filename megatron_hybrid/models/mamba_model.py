"""MambaModel: embedding -> hybrid stack -> output layer, buildable whole or as one pipeline stage."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.init import normal_init
from megatron_hybrid.layers.sharded_param import sharded_parameter
from megatron_hybrid.models.specs import local_stack_spec
from megatron_hybrid.parallel.cross_entropy import LogitsWorkspace, linear_cross_entropy, vocab_parallel_cross_entropy
from megatron_hybrid.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
)
from megatron_hybrid.parallel.state import ParallelGroups
from megatron_hybrid.parallel.tensor_parallel import VocabParallelEmbedding
from megatron_hybrid.spec import ModuleSpec, build_module


class LanguageModelEmbedding(nn.Module):
    """Word embeddings (vocab-parallel), no position table: the hybrid models use none or RoPE."""

    def __init__(self, config: HybridConfig, groups: ParallelGroups) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size,
            config.hidden_size,
            groups=groups,
            init_method=normal_init(config.init_method_std),
            dtype=config.params_dtype,
            # Under sequence parallelism the embedding reduce-scatters straight to [s/tp, b, h] (Megatron's way),
            # half the traffic of an all-reduce followed by a split.
            reduce_scatter_embeddings=config.sequence_parallel,
        )
        self.sequence_parallel = config.sequence_parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [b, s] -> [s, b, h], or this rank's sequence slice [s/tp, b, h] under sequence parallelism."""
        embeddings = self.word_embeddings(input_ids)
        return embeddings if self.sequence_parallel else embeddings.transpose(0, 1).contiguous()


def document_position_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document start of a packed row (``seq_idx`` [b, s] -> [b, s])."""
    seqlen = seq_idx.shape[1]
    index = torch.arange(seqlen, device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start_of_document = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of_document


class MambaModel(nn.Module):
    """A hybrid Mamba-2 / attention / MLP language model.

    ``pre_process`` / ``post_process`` say whether this instance (a pipeline stage) owns the embedding and the output
    layer; ``layer_range`` selects the contiguous slice of the layer pattern it owns. The whole model is the default.
    """

    def __init__(
        self,
        config: HybridConfig,
        groups: ParallelGroups | None = None,
        stack_spec: ModuleSpec = local_stack_spec,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.groups = groups if groups is not None else ParallelGroups.single()
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = not config.untie_embeddings_and_output_weights
        if config.padded_vocab_size % self.groups.tp_size:
            raise ValueError(
                f"padded vocabulary {config.padded_vocab_size} is not divisible by tensor parallel size "
                f"{self.groups.tp_size}; raise make_vocab_size_divisible_by"
            )

        self.embedding = LanguageModelEmbedding(config, self.groups) if pre_process else None
        self.decoder = build_module(
            stack_spec, config=config, groups=self.groups, layer_range=layer_range, post_process=post_process
        )
        self.output_layer = None
        if post_process and not (self.share_embeddings_and_output_weights and pre_process):
            # Untied, or tied but on a last pipeline stage that does not hold the embedding: a separate copy that the
            # pipeline schedule keeps equal to the embedding by summing their gradients.
            weight = normal_init(config.init_method_std)(
                torch.empty(config.padded_vocab_size, config.hidden_size, dtype=config.params_dtype)
            )
            self.output_layer = nn.Module()
            self.output_layer.weight = sharded_parameter(weight, self.groups)
            self.output_layer.weight.shared_embedding = self.share_embeddings_and_output_weights
        # The fused CPU output layer + loss keeps its [tokens, vocab] buffer here between steps (see LogitsWorkspace).
        self._logits_workspace = LogitsWorkspace()

    @property
    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        """Run the model (or this pipeline stage).

        ``input_ids`` [b, s] on the first stage, ``hidden_states`` [s, b, h] (from the previous stage) otherwise.
        ``seq_idx`` [b, s] marks the document of every token of a packed row: no state, convolution window or
        attention crosses a document boundary, and RoPE positions restart per document.
        Returns logits [b, s, vocab] (gathered over tensor parallelism, padding removed), or the per-token loss
        [b, s] when ``labels`` are given, or hidden states [s, b, h] on a stage without the output layer.

        ``inference_context`` (``megatron_hybrid.inference.InferenceContext``) switches to cached generation: a
        prefill of prompts into empty cache slots, or one decode step (``s == 1``) of every active slot, with RoPE
        positions taken from the context. With its ``last_token_logits_only`` only the last position's logits are
        computed (a long prompt's full [s, vocab] logits would not fit).
        """
        groups, config = self.groups, self.config
        if inference_context is not None and position_ids is None and inference_context.is_decode:
            position_ids = inference_context.decode_positions()[:, None]
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32)
            if position_ids is None:
                position_ids = document_position_ids(seq_idx)
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            hidden_states = self.embedding(input_ids)
            hidden_states = F.dropout(hidden_states, p=config.hidden_dropout, training=self.training)
        elif hidden_states is None:
            raise ValueError("a pipeline stage without the embedding needs hidden_states from the previous stage")

        hidden_states = self.decoder(
            hidden_states, seq_idx=seq_idx, position_ids=position_ids, inference_context=inference_context
        )
        if not self.post_process:
            return hidden_states
        if inference_context is not None and inference_context.last_token_logits_only:
            hidden_states = hidden_states[-1:]

        if config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel(hidden_states, groups.tp)
        else:
            hidden_states = copy_to_tp(hidden_states, groups.tp)
        if labels is not None and groups.tp_size == 1 and hidden_states.device.type == "cpu":
            # Output layer and loss fused: the [s, b, vocab] logits are never materialised as a separate tensor.
            # CPU only: its float32 slice-by-slice matmuls would bypass autocast's bf16 tensor cores on a GPU, where
            # vocab_parallel_cross_entropy below (Triton kernels, else chunked) keeps the memory down instead.
            loss = linear_cross_entropy(
                hidden_states, self.output_weight, labels.transpose(0, 1), self._logits_workspace
            )
            return loss.transpose(0, 1).contiguous()
        logits = F.linear(hidden_states, self.output_weight)  # [s, b, vocab / tp]
        if labels is not None:
            # bf16 logits as they are: the loss upcasts them itself (no float32 [s, b, vocab] copy here); nothing
            # reads these logits after it, so its backward may write the gradient over them.
            loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), groups, reuse_logits=True)
            return loss.transpose(0, 1).contiguous()
        logits = gather_from_tp(logits, groups.tp)[..., : config.vocab_size]
        return logits.transpose(0, 1).contiguous()

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Write a transformers NemotronH directory (config.json + safetensors) for this model."""
        from megatron_hybrid.interop.hf import save_pretrained

        save_pretrained(self, path, **kwargs)


def count_parameters(config: HybridConfig) -> dict[str, int]:
    """Parameters of a TP=1 model, from a meta-device instantiation (no memory, no init cost)."""
    with torch.device("meta"):
        model = MambaModel(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embedding.word_embeddings.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
