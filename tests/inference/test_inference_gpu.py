"""CUDA decode (marked gpu; run by ``make test-gpu``): CUDA-graph replay equals eager decoding, and cached decoding
equals the full forward on the GPU path (Triton kernels when mamba_ssm loads, else the torch fallbacks)."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TOLERANCE, make_model, random_ids, relative_error

from megatron_hybrid.inference import InferenceEngine, SamplingParams
from megatron_hybrid.inference.model_runner import ModelRunner, graph_buckets, set_decode_fusions

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


def _fusion_settings() -> dict[str, dict[str, bool]]:
    return {
        "fused": dict(mamba=True, attention=True, residual=True),
        "unfused": dict(mamba=False, attention=False, residual=False),
    }


def test_greedy_fast_path_with_cuda_graphs_matches_eager_and_the_unfused_decode() -> None:
    """All-greedy requests without log-probs take ``decode_greedy`` (argmax inside the graph); graphs and eager give
    the same tokens, and the fused decode kernels (Triton attention, residual carried into the norms, fused Mamba
    step) the tokens of the unfused path; log-probs of fused and unfused agree to float32 rounding."""
    model = make_model("hybrid_rope_swiglu_bias").cuda()
    prompts = [random_ids(model.config.vocab_size, n, seed=n) for n in (4, 19, 11, 19)]
    results = {}
    try:
        for name, fusions in _fusion_settings().items():
            set_decode_fusions(model, **fusions)
            for graphs in (False, True):
                engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=64, use_cuda_graphs=graphs)
                greedy = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
                scored = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True))
                assert [o.token_ids for o in greedy] == [o.token_ids for o in scored]
                results[name, graphs] = scored
    finally:
        set_decode_fusions(model)
    reference = results["unfused", False]
    for key, outputs in results.items():
        for output, expected in zip(outputs, reference):
            assert output.token_ids == expected.token_ids, key
            assert torch.allclose(torch.tensor(output.logprobs), torch.tensor(expected.logprobs), atol=1e-4), key


@pytest.mark.parametrize("variant", ["hybrid_rope_swiglu_bias", "hybrid_gelu_fp32_residual_tied"])
def test_bf16_decode_fusions_match_the_unfused_step(variant: str) -> None:
    """bf16 (the benchmark's precision): a prefill, then decode steps from identical caches with every fusion on and
    off; logits agree to bf16 rounding and the caches written by the steps to one bf16 rounding step."""
    model = make_model(variant).to(device="cuda", dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    prompts = torch.tensor([random_ids(vocab, 9, seed=s) for s in range(3)], device="cuda")
    runs = {}
    try:
        for name, fusions in _fusion_settings().items():
            set_decode_fusions(model, **fusions)
            runner = ModelRunner(model, max_batch_size=4, max_sequence_length=32)
            runner.prefill(0, prompts)
            logits = [runner.decode([1 + step, 2, 3], [9 + step] * 3, 10 + step).float() for step in range(4)]
            runs[name] = logits, [t.float().clone() for pair in runner.context.kv.values() for t in pair]
    finally:
        set_decode_fusions(model)
    (fused, fused_kv), (unfused, unfused_kv) = runs["fused"], runs["unfused"]
    for step, (a, b) in enumerate(zip(fused, unfused)):
        assert relative_error(a, b) <= 3e-2, f"step {step}"
    for a, b in zip(fused_kv, unfused_kv):
        assert relative_error(a, b) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["hybrid_rope_swiglu_bias", "hybrid_gelu_fp32_residual_tied",
                                     "mamba_ngroups4_dt_limit", "attention_partial_rope_mqa"])
def test_fused_decode_step_matches_the_layer_path(variant: str, dtype: torch.dtype) -> None:
    """Batch-1 steps through ``FusedDecoder`` (eager, and replayed in the batch-1 CUDA graph with PDL where the GPU
    has it) against the layer path from identical caches: logits and every cache, float32 to 1e-4 relative, bf16 to
    its rounding (the two paths round at the same places; only float32 summation order differs)."""
    model = make_model(variant).to(device="cuda", dtype=dtype)
    vocab = model.config.vocab_size
    prompt = torch.tensor([random_ids(vocab, 9, seed=3)], device="cuda")
    tokens = random_ids(vocab, 5, seed=4)
    runs = {}
    for name, fused, graphs in (("layers", False, False), ("fused", True, False), ("fused_graph", True, True)):
        runner = ModelRunner(model, max_batch_size=2, max_sequence_length=32, use_cuda_graphs=graphs,
                             fused_decode_step=fused)
        assert (runner.fused_decoder is not None) is fused
        runner.prefill(0, prompt)
        # clone: with graphs, decode returns the graph's static output, which the next step overwrites
        logits = [runner.decode([token], [9 + step], 10 + step).float().clone() for step, token in enumerate(tokens)]
        caches = [t.float().clone() for pair in (*runner.context.mamba.values(), *runner.context.kv.values())
                  for t in pair]
        runs[name] = logits, caches
    bound = TOLERANCE if dtype == torch.float32 else 2e-2
    reference_logits, reference_caches = runs.pop("layers")
    for name, (logits, caches) in runs.items():
        for step, (a, b) in enumerate(zip(logits, reference_logits)):
            assert relative_error(a, b) <= bound, f"{name} step {step}"
        for index, (a, b) in enumerate(zip(caches, reference_caches)):
            assert relative_error(a, b) <= bound, f"{name} cache {index}"


def test_pipelined_greedy_graph_steps_give_the_eager_tokens() -> None:
    """With CUDA graphs, greedy steps are pipelined (the next step queued on the device-fed inputs before the host
    reads this one's tokens): requests ending by stop token and by length at different steps, and one admitted
    mid-run, get exactly the tokens of eager decoding."""
    model = make_model("hybrid_gelu_fp32_residual_tied", seed=4).cuda()
    vocab = model.config.vocab_size
    prompts = [random_ids(vocab, n, seed=30 + n) for n in (3, 8, 5, 6)]
    eager = InferenceEngine(model, max_batch_size=3, max_sequence_length=48)
    stop = eager.generate([prompts[0]], SamplingParams(max_new_tokens=12, temperature=0.0))[0].token_ids[3]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,))] + [
        SamplingParams(max_new_tokens=n, temperature=0.0) for n in (5, 9, 20)
    ]
    outputs = {}
    for graphs in (False, True):
        engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=48, use_cuda_graphs=graphs)
        assert engine._pipelined is graphs
        for index in range(3):
            engine.add_request(f"r{index}", prompts[index], params[index])
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 2:
                engine.add_request("r3", prompts[3], params[3])
        outputs[graphs] = {rid: (o.token_ids, o.finish_reason) for rid in ("r0", "r1", "r2", "r3")
                           for o in [engine.pop_output(rid)]}
    assert outputs[True] == outputs[False]
    assert outputs[False]["r0"][1] == "stop"
