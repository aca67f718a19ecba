"""CUDA graphs of the hybrid layers (``training.cuda_graphs``): training steps through the graph replays equal the
same steps run eagerly (loss, every gradient, the weights after AdamW), with gradient accumulation over micro-batches
and packed documents too; calls the graphs do not cover (evaluation, no_grad, another shape) run the layers eagerly
and give the eager results."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.training.cuda_graphs import enable_layer_graphs

pytestmark = pytest.mark.gpu

# Replays run the kernels the eager calls run, on the same inputs; the only freedom left is the GEMM algorithm that
# cuBLAS picks inside a capture, so the results are asked to agree to float32 rounding of the bf16 products' sums.
REL = 2e-6


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _config() -> HybridConfig:
    return HybridConfig(num_layers=5, hybrid_override_pattern="M*M-M", hidden_size=256, vocab_size=1000,
                        num_attention_heads=4, num_query_groups=2, position_embedding_type="rope",
                        ffn_hidden_size=512, mamba_state_dim=64, mamba_head_dim=32, mamba_num_groups=2,
                        mamba_chunk_size=64)


def _pair() -> tuple[MambaModel, MambaModel]:
    torch.manual_seed(0)
    eager = MambaModel(_config()).cuda()
    graphed = copy.deepcopy(eager)
    enable_layer_graphs(graphed)
    return eager, graphed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _step(model: MambaModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
          seq_idx: torch.Tensor | None = None, micro_batches: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over ``micro_batches`` forward/backward passes (gradient accumulation; the i-th pass reads
    the ids shifted by i, so each contributes a different gradient)."""
    total = torch.zeros((), device="cuda")
    for index in range(micro_batches):
        micro = ids.roll(index, dims=1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(micro, labels=micro.roll(-1, dims=1), seq_idx=seq_idx).float().mean()
        loss.backward()
        total += loss.detach()
    loss = total
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("documents", [False, True])
def test_graphed_training_steps_equal_eager_steps(documents: bool) -> None:
    eager, graphed = _pair()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (eager, graphed)]
    eager_calls = []
    graphed.decoder.layers["0"].register_forward_pre_hook(lambda *_: eager_calls.append(1))
    seq_idx = None
    if documents:  # three documents per row, boundaries off the chunk grid
        seq_idx = torch.zeros(2, 320, dtype=torch.int32, device="cuda")
        seq_idx[:, 77:] = 1
        seq_idx[:, 200:] = 2
    for step in range(4):
        ids = torch.randint(0, 1000, (2, 320), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        loss_e, grads_e = _step(eager, optimizers[0], ids, seq_idx, micro_batches=1 + step % 2)
        loss_g, grads_g = _step(graphed, optimizers[1], ids, seq_idx, micro_batches=1 + step % 2)
        if step == 0:  # the capture ran the layers (warm-up and capture); from now on only replays may run
            assert graphed.decoder.layer_graphs.captured and eager_calls
            eager_calls.clear()
        assert _rel(loss_g, loss_e) <= REL, (step, _rel(loss_g, loss_e))
        worst = max(grads_e, key=lambda name: _rel(grads_g[name], grads_e[name]))
        assert _rel(grads_g[worst], grads_e[worst]) <= REL, (step, worst, _rel(grads_g[worst], grads_e[worst]))
    assert not eager_calls  # every later step replayed the graphs
    for (name, p_e), p_g in zip(eager.named_parameters(), graphed.parameters()):
        assert _rel(p_g, p_e) <= REL, name


def test_calls_outside_the_captured_signature_run_eagerly() -> None:
    eager, graphed = _pair()
    eager_calls = []
    graphed.decoder.layers["0"].register_forward_pre_hook(lambda *_: eager_calls.append(1))
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    _step(graphed, torch.optim.SGD(graphed.parameters(), lr=0.0), ids)  # captures for [256, 2, 256]
    assert graphed.decoder.layer_graphs.captured
    eager_calls.clear()  # the capture ran the layers
    _step(graphed, torch.optim.SGD(graphed.parameters(), lr=0.0), ids)
    assert not eager_calls  # a replay

    # Another batch size in training: eager, with a warning that names both signatures.
    other = torch.randint(0, 1000, (3, 256), device="cuda")
    with pytest.warns(UserWarning, match="runs the layers eagerly"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_g = graphed(other)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_e = eager(other)
    assert len(eager_calls) == 1 and _rel(out_g.float(), out_e.float()) <= REL

    # Without autocast (the graphs hold bf16 casts): eager, float32 results.
    out_g, out_e = graphed(ids), eager(ids)
    assert len(eager_calls) == 2 and out_g.dtype == torch.float32 and _rel(out_g, out_e) <= 1e-6

    # no_grad and eval mode: eager.
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        graphed(ids)
    graphed.eval()
    eager.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_g, out_e = graphed(ids), eager(ids)
    assert len(eager_calls) == 4 and _rel(out_g.float(), out_e.float()) <= REL

