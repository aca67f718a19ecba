"""CUDA decode (marked gpu; run by ``make test-gpu``): CUDA-graph replay equals eager decoding, and cached decoding
equals the full forward on the GPU path (Triton kernels when mamba_ssm loads, else the torch fallbacks)."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TOLERANCE, make_model, random_ids, relative_error

from megatron_hybrid.inference import InferenceEngine, SamplingParams
from megatron_hybrid.inference.model_runner import graph_buckets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::megatron_hybrid.ops.KernelFallbackWarning"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 everywhere (cuDNN convolutions default to TF32, which would blur the comparisons)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    lengths = [5, 17, 9, 3, 17, 30]
    return [
        (random_ids(vocab, n, seed=n + i),
         SamplingParams(max_new_tokens=6 + 2 * i, temperature=0.0 if i % 2 else 0.9, top_k=0 if i % 2 else 10,
                        seed=i, logprobs=True))
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("variant", ["hybrid_rope_swiglu_bias", "mamba_ngroups4_dt_limit"])
def test_cuda_graph_decode_equals_eager(variant: str) -> None:
    model = make_model(variant).cuda()
    requests = _requests(model.config.vocab_size)
    results = {}
    for graphs in (False, True):
        engine = InferenceEngine(model, max_batch_size=5, max_sequence_length=64, use_cuda_graphs=graphs)
        assert engine.use_cuda_graphs is graphs
        if graphs:
            assert sorted(engine.runner._graphs) == graph_buckets(5) == [1, 2, 4, 5]
        results[graphs] = engine.generate([p for p, _ in requests], [s for _, s in requests])
    for eager, graphed in zip(results[False], results[True]):
        assert graphed.token_ids == eager.token_ids
        assert torch.allclose(torch.tensor(graphed.logprobs), torch.tensor(eager.logprobs), atol=1e-4)


def test_gpu_cached_decode_matches_full_forward() -> None:
    model = make_model("hybrid_rope_swiglu_bias").cuda()
    engine = InferenceEngine(model, max_batch_size=4, max_sequence_length=64, use_cuda_graphs=True)
    prompts = [random_ids(model.config.vocab_size, n, seed=n) for n in (4, 19, 11)]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=True)
    for prompt, output in zip(prompts, engine.generate(prompts, params)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + output.token_ids], device="cuda"))[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        expected = log_probs.gather(-1, torch.tensor(output.token_ids, device="cuda")[:, None])[:, 0].cpu()
        # The Triton scan may round through TF32 inside its float32 matmuls: a looser bound than the CPU tests'.
        assert relative_error(torch.tensor(output.logprobs), expected) <= 100 * TOLERANCE
