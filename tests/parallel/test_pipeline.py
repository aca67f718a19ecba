"""Pipeline parallelism: stage layout and initialisation, and the 1F1B schedule over real gloo processes.

The oracle is the unsplit model in one process: after one global step of 4 micro-batches, the loss and every
parameter gradient of every stage (tensor-parallel shards gathered, the tied embedding's two halves summed) must equal
the single model's. Layouts: pp=2 (tied and untied embeddings), pp=4 (middle stages, tied embedding across non-adjacent
ranks) and pp=2 x tp=2 with sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.models.pipeline_stage import build_pipeline_stage, stage_layer_ranges
from megatron_hybrid.parallel.grads import allreduce_sequence_parallel_grads
from megatron_hybrid.parallel.pipeline import (
    StageIO,
    broadcast_from_last_stage,
    forward_backward_pipelining,
    forward_only_pipelining,
    initialize_pipeline_communication,
)
from megatron_hybrid.parallel.sharding import unshard_tensors
from megatron_hybrid.parallel.state import initialize_parallel_groups
from megatron_hybrid.parallel.testing import run_distributed
from megatron_hybrid.parallel.tied_embeddings import allreduce_tied_embedding_grads, sync_tied_embedding_weights
from megatron_hybrid.training.loop import forward_step

SEQ, MICRO, NUM_MICRO, VOCAB, SEED = 16, 2, 4, 64, 3
TOL = 1e-5


def _config(untied: bool = False, sequence_parallel: bool = False, pattern: str = "M*-M") -> HybridConfig:
    return HybridConfig(
        num_layers=len(pattern.replace("|", "")), hybrid_override_pattern=pattern, hidden_size=32, vocab_size=VOCAB,
        num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, position_embedding_type="rope",
        mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2, mamba_chunk_size=8,
        untie_embeddings_and_output_weights=untied, sequence_parallel=sequence_parallel,
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    """Micro-batches with packed documents (seq_idx) and a partial loss mask, identical in every process."""
    generator = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(NUM_MICRO):
        text = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=generator)
        seq_idx = torch.zeros(MICRO, SEQ, dtype=torch.int32)
        seq_idx[0, 6:] = 1
        batches.append({"tokens": text[:, :-1], "labels": text[:, 1:], "seq_idx": seq_idx,
                        "loss_mask": (torch.rand(MICRO, SEQ, generator=generator) > 0.2).float()})
    return batches


def _loss_scale(batches: list[dict[str, torch.Tensor]]) -> float:
    return 1.0 / float(sum(b["loss_mask"].sum() for b in batches))


def _reference(config: HybridConfig) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """Loss, gradients and logits of the unsplit model (same seed) on the same step, in this process."""
    torch.manual_seed(SEED)
    model = MambaModel(config.replace(sequence_parallel=False))
    batches = _batches()
    scale, total = _loss_scale(batches), 0.0
    for batch in batches:
        loss = forward_step(model, batch, bf16=False)
        (loss * scale).backward()
        total += float(loss.detach())
    with torch.no_grad():
        logits = model(batches[0]["tokens"], seq_idx=batches[0]["seq_idx"])
    return total * scale, {n: p.grad for n, p in model.named_parameters()}, logits


def _pipeline_step(rank: int, world_size: int, layouts: list[tuple[int, int, bool, bool]]) -> list[dict]:
    """Run :func:`_one_layout` for each layout (tp, pp, sequence_parallel, untied) on this rank."""
    return [_one_layout(*layout) for layout in layouts]


def _one_layout(tp: int, pp: int, sequence_parallel: bool, untied: bool) -> dict:
    """Build this rank's stage, run one global step through the 1F1B schedule; return loss, gradients (with their
    sharding) and the forward-only logits."""
    groups = initialize_parallel_groups(tp=tp, pp=pp)
    config = _config(untied, sequence_parallel)
    torch.manual_seed(SEED)
    model = build_pipeline_stage(config, groups)
    initialize_pipeline_communication(groups, torch.device("cpu"))
    sync_tied_embedding_weights(model, groups)
    batches = _batches()
    seq = SEQ // tp if sequence_parallel else SEQ
    io = StageIO((seq, MICRO, config.hidden_size), torch.float32, torch.device("cpu"))
    losses = forward_backward_pipelining(lambda i, h: forward_step(model, batches[i], False, h), NUM_MICRO,
                                         groups, io, loss_scale=_loss_scale(batches))
    assert len(losses) == (NUM_MICRO if groups.is_pipeline_last else 0)
    allreduce_sequence_parallel_grads(model, groups)
    allreduce_tied_embedding_grads(model, groups)
    loss = broadcast_from_last_stage(torch.tensor(float(sum(losses))), groups)

    def logits_step(index: int, hidden: torch.Tensor | None) -> torch.Tensor:
        batch = batches[0]
        return model(batch["tokens"] if model.pre_process else None, seq_idx=batch["seq_idx"], hidden_states=hidden)

    logits = forward_only_pipelining(logits_step, 1, groups, io)
    return {
        "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "loss": float(loss) * _loss_scale(batches),
        "grads": {n: (p.grad.clone(), getattr(p, "tp_dim", None), getattr(p, "tp_components", None))
                  for n, p in model.named_parameters()},
        "logits": logits[0] if logits else None,
    }


def _check_layout(per_rank: list[dict], tp: int, config: HybridConfig) -> None:
    loss, expected, logits = _reference(config)
    assert all(abs(r["loss"] - loss) <= TOL * abs(loss) for r in per_rank), ([r["loss"] for r in per_rank], loss)
    seen = set()
    for tp_rank0 in (r for r in per_rank if r["tp_rank"] == 0):
        shards = [r for r in per_rank if r["pp_rank"] == tp_rank0["pp_rank"]]
        shards.sort(key=lambda r: r["tp_rank"])
        assert len(shards) == tp
        for name, (grad, tp_dim, components) in tp_rank0["grads"].items():
            if tp_dim is not None:
                grad = unshard_tensors([s["grads"][name][0] for s in shards], tp_dim, components)
            # The last stage's copy of a tied embedding holds the summed gradient of the one tied matrix.
            reference = expected["embedding.word_embeddings.weight" if name not in expected else name]
            scale = reference.abs().max().clamp(min=1e-30)
            assert ((grad - reference).abs().max() / scale).item() <= TOL, (tp_rank0["pp_rank"], name)
            seen.add(name)
    assert set(expected) <= seen
    last = [r["logits"] for r in per_rank if r["logits"] is not None]
    assert len(last) == tp  # the last stage's tensor-parallel ranks
    for got in last:
        torch.testing.assert_close(got, logits, rtol=TOL, atol=TOL)


def test_pipeline_schedule_pp2_equals_single_model() -> None:
    layouts = [(1, 2, False, False), (1, 2, False, True)]
    results = run_distributed(_pipeline_step, 2, layouts, timeout=120)
    for index, (tp, _, sequence_parallel, untied) in enumerate(layouts):
        _check_layout([r[index] for r in results], tp, _config(untied, sequence_parallel))


def test_pipeline_schedule_pp4_and_pp2_tp2_equal_single_model() -> None:
    layouts = [(1, 4, False, False), (2, 2, True, False)]
    results = run_distributed(_pipeline_step, 4, layouts, timeout=180)
    for index, (tp, _, sequence_parallel, untied) in enumerate(layouts):
        _check_layout([r[index] for r in results], tp, _config(untied, sequence_parallel))


# ---------------------------------------------------------------------------------------------------------------------
# Layout and initialisation (single process).


@pytest.mark.parametrize("untied", [False, True])
def test_stages_start_from_the_single_model_weights(untied: bool) -> None:
    config = _config(untied, pattern="M*-M-M")
    torch.manual_seed(SEED)
    full = MambaModel(config).state_dict()
    for pipeline_size in (2, 3, 6):
        names = set()
        for rank in range(pipeline_size):
            torch.manual_seed(SEED)
            stage = build_pipeline_stage(config, pipeline_rank=rank, pipeline_size=pipeline_size)
            for name, value in stage.state_dict().items():
                if name == "output_layer.weight" and not untied:
                    continue  # the tied copy: filled from the first stage by sync_tied_embedding_weights
                assert torch.equal(value, full[name]), (pipeline_size, rank, name)
                names.add(name)
        assert names == set(full)


def test_stage_layouts_and_errors() -> None:
    assert stage_layer_ranges(_config(), 1) == [(0, 4)]
    assert stage_layer_ranges(_config(), 2) == [(0, 2), (2, 4)]
    assert stage_layer_ranges(_config(pattern="M|*-M"), 2) == [(0, 1), (1, 4)]
    assert stage_layer_ranges(_config(pattern="M|*-M"), 1) == [(0, 4)]  # separators ignored without a pipeline
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        stage_layer_ranges(_config(), 8)
    with pytest.raises(ValueError, match="2 pipeline stages, but pipeline_size=3"):
        stage_layer_ranges(_config(pattern="M*|-M"), 3)
    with pytest.raises(ValueError, match="cannot split 4 layers evenly"):
        stage_layer_ranges(_config(), 3)
    with pytest.raises(ValueError, match="outside a pipeline of size 2"):
        build_pipeline_stage(_config(), pipeline_rank=2, pipeline_size=2)
