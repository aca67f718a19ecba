"""The decode-step fusions and the engine's step plumbing, on CPU.

* The residual carry of ``MambaStack`` (a layer's update added to the stream inside the next norm) is bit-identical
  to the layers' own ``forward`` (logits and every cache), for every layer type, a float32 residual stream, tied
  embeddings, and a pipeline stage without the final norm; stacks with other layers fall back to ``forward``.
* The whole GPU decode path (fused Mamba step, Triton decode attention with its cache write, Triton add + RMSNorm)
  run in Triton's CPU interpreter (dispatch forced on CPU tensors) equals the full forward, like the layers' path.
* ``ModelRunner.decode`` takes lists or tensors alike, ``decode_greedy`` is the argmax of ``decode``; the pinned
  staging upload (emulated on CPU) writes the leading rows and zeroes the others; the engine's all-greedy fast path
  gives the tokens of its sampling path.

The interpreter tests need ``TRITON_INTERPRET=1`` before triton is imported (the pattern of
``tests/ops/test_triton_decode.py``): set at collection when possible, else they run in a fresh subprocess.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_testlib import TOLERANCE, VARIANTS, full_logits, make_config, make_model, random_ids, relative_error

from megatron_hybrid.inference import InferenceEngine, SamplingParams, fused_decode
from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.model_runner import ModelRunner
from megatron_hybrid.inference.sampling import greedy_tokens
from megatron_hybrid.layers.hybrid_layers import MLPLayer
from megatron_hybrid.models.mamba_stack import MambaStack
from megatron_hybrid.parallel.state import ParallelGroups

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton
except Exception:  # the interpreter tests skip without triton; the rest does not need it
    triton = None
INTERPRETED = triton is not None and type(triton.language.zeros).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton missing, or imported without TRITON_INTERPRET=1 (test_in_a_fresh_process)"
)

PROMPTS = [5, 13, 1, 13]  # lengths; the two 13-token prompts are prefilled together
STEPS = 5


def _run(runner: ModelRunner, model, *, check_against_full: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill PROMPTS into slots 0..3, then STEPS teacher-forced decode steps of all four (a slot move midway);
    returns every step's logits and the final caches, optionally checking each step against the full forward."""
    vocab = model.config.vocab_size
    sequences = [random_ids(vocab, n, seed=10 + i) for i, n in enumerate(PROMPTS)]
    continuations = [random_ids(vocab, STEPS, seed=50 + i) for i in range(len(PROMPTS))]
    references = [full_logits(model, s + c) for s, c in zip(sequences, continuations)] if check_against_full else []
    outputs = []
    for slot, group in ((0, [0]), (1, [1, 3]), (3, [2])):
        outputs.append(runner.prefill(slot, torch.tensor([sequences[i] for i in group])))
    rows = [0, 1, 3, 2]
    for step in range(STEPS):
        if step == 2:  # the sequence of slot 1 finishes: the last slot's caches move in
            runner.move_slot(len(rows) - 1, 1, length=len(sequences[rows[-1]]))
            rows[1] = rows.pop()
        tokens = [continuations[i][step] for i in rows]
        positions = [len(sequences[i]) for i in rows]
        logits = runner.decode(tokens, positions, attention_length=max(positions) + 1)
        outputs.append(logits)
        for slot, index in enumerate(rows):
            sequences[index].append(continuations[index][step])
            if check_against_full:
                error = relative_error(logits[slot], references[index][len(sequences[index]) - 1])
                assert error <= TOLERANCE, f"step {step}, sequence {index}: relative error {error:.3g}"
    context = runner.context
    caches = [t.clone() for pair in (*context.mamba.values(), *context.kv.values()) for t in pair]
    return outputs, caches


def _carry_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = MambaStack._decode_carrying_residual

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MambaStack, "_decode_carrying_residual", counting)
    return calls


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_residual_carry_is_bit_identical_to_the_layers_forward(variant: str, monkeypatch) -> None:
    model = make_model(variant)
    calls = _carry_calls(monkeypatch)
    results = {}
    for carry in (False, True):
        model.decoder.fused_residual_decode = carry
        runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32, lean_decode=False)
        results[carry] = _run(runner, model, check_against_full=carry)
    assert len(calls) == STEPS  # every decode step carried the residual, no prefill did
    (logits_off, caches_off), (logits_on, caches_on) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(logits_on, logits_off))
    assert all(torch.equal(a, b) for a, b in zip(caches_on, caches_off))


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_residual_carry_of_a_pipeline_stage_without_final_norm(residual_in_fp32: bool, monkeypatch) -> None:
    """A stage that hands the stream on (no final norm) returns the stream itself, its last add done on its own."""
    config = make_config("hybrid_rope_swiglu_bias", residual_in_fp32=residual_in_fp32)
    torch.manual_seed(3)
    stack = MambaStack(config, ParallelGroups.single(), layer_range=(1, 5), post_process=False).eval()
    assert stack.final_norm is None and stack.carries_residual
    calls = _carry_calls(monkeypatch)
    context = InferenceContext(stack, max_batch_size=2, max_sequence_length=16)
    hidden = torch.randn(6, 2, config.hidden_size)
    steps = [torch.randn(1, 2, config.hidden_size) for _ in range(3)]
    results = {}
    with torch.inference_mode():
        for carry in (False, True):
            stack.fused_residual_decode = carry
            context.reset()
            context.set_prefill(0, 2)
            outputs = [stack(hidden, inference_context=context)]
            context.set_decode(2)
            for position, step in enumerate(steps, start=6):
                context.positions[:2] = position
                outputs.append(stack(step, inference_context=context, position_ids=context.positions[:2, None]))
            results[carry] = outputs
    assert len(calls) == len(steps)
    for on, off in zip(results[True], results[False]):
        assert on.dtype == off.dtype == (torch.float32 if residual_in_fp32 else config.params_dtype)
        assert torch.equal(on, off)


class _CustomMLPLayer(MLPLayer):
    """A layer with its own forward: the stack must call it, not split it into norm and mix."""

    def forward(self, hidden_states, seq_idx=None, position_ids=None, inference_context=None):
        return super().forward(hidden_states, seq_idx, position_ids, inference_context) * 1.0


def test_stacks_with_other_layers_fall_back_to_forward(monkeypatch) -> None:
    model = make_model("hybrid_gelu_fp32_residual_tied")
    assert model.decoder.carries_residual
    layer = model.decoder.layers["1"]
    assert type(layer) is MLPLayer
    layer.__class__ = _CustomMLPLayer  # same parameters, overridden forward
    assert not model.decoder.carries_residual
    calls = _carry_calls(monkeypatch)
    runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32, lean_decode=False)
    _run(runner, model, check_against_full=True)
    assert not calls


# ------------------------------------------------------------------------------------------ the GPU path, interpreted


@pytest.mark.skipif(triton is None or INTERPRETED, reason="no triton, or the tests of this module run in this process")
def test_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()), "-k",
         "interpreted"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    """The decode kernels (re)imported in interpreter mode and the dispatch forced to them for CPU tensors; returns
    the kernel calls made, by module."""
    from megatron_hybrid.layers import attention
    from megatron_hybrid.ops import backend, mamba_ssm_loader

    os.environ["TRITON_INTERPRET"] = "1"
    # the shared jit helpers too: a kernel interpreted now must not call ones compiled for a GPU
    importlib.reload(importlib.import_module("megatron_hybrid.ops._triton_common"))
    modules = {}
    for name in ("triton_decode", "triton_add_norm", "triton_attention", "triton_fused_gemv"):
        full = f"megatron_hybrid.ops.{name}"
        module = importlib.reload(sys.modules[full]) if full in sys.modules else importlib.import_module(full)
        if module.UNAVAILABLE_REASON is not None:
            pytest.skip(module.UNAVAILABLE_REASON)
        modules[full] = module
    calls: dict[str, int] = {}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)

        return call

    mamba_step = counted("triton_decode", modules["megatron_hybrid.ops.triton_decode"].mamba_decode_step_triton)
    monkeypatch.setattr(backend, "_fused_decode_kernel", lambda op, mode, tensor: mamba_step)
    monkeypatch.setattr(backend, "_own_triton_kernel",
                        lambda op, mode, tensor, module_name, entry, what, fallback:
                        counted(module_name.rsplit(".", 1)[1], getattr(modules[module_name], entry)))
    monkeypatch.setattr(attention, "FUSED_DECODE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_decode, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_decode, "load_own_triton", lambda module_name, entry, what: None)
    mamba_ssm_loader.reset_kernel_cache()
    yield calls
    mamba_ssm_loader.reset_kernel_cache()
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@needs_interpreter
@pytest.mark.parametrize("variant", ["hybrid_rope_swiglu_bias", "hybrid_gelu_fp32_residual_tied",
                                     "attention_partial_rope_mqa", "attention_no_rope_mha"])
def test_interpreted_gpu_decode_path_matches_full_forward(variant: str, gpu_path_on_cpu) -> None:
    """Every decode kernel of the CUDA path, wired through the layers and the stack, against the full forward."""
    model = make_model(variant)
    runner = ModelRunner(model, max_batch_size=5, max_sequence_length=32, lean_decode=False)
    _run(runner, model, check_against_full=True)
    pattern = model.config.layer_pattern
    calls = gpu_path_on_cpu
    assert calls.get("triton_attention", 0) == STEPS * pattern.count("*")
    assert calls.get("triton_decode", 0) == STEPS * pattern.count("M")
    assert calls.get("triton_add_norm", 0) == STEPS * len(pattern)  # every layer after the first, and the final norm


def _batch_one_run(model, fused: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A prompt, then STEPS batch-1 decode steps (through ``FusedDecoder`` or the layers); every step's logits (copied)
    and the final caches."""
    vocab = model.config.vocab_size
    runner = ModelRunner(model, max_batch_size=2, max_sequence_length=32, lean_decode=False, fused_decode_step=fused)
    assert (runner.fused_decoder is not None) is fused
    prompt, continuation = random_ids(vocab, 7, seed=1), random_ids(vocab, STEPS, seed=2)
    runner.prefill(0, torch.tensor([prompt]))
    logits = [runner.decode([token], [7 + step], 8 + step).clone() for step, token in enumerate(continuation)]
    caches = [t.clone() for pair in (*runner.context.mamba.values(), *runner.context.kv.values()) for t in pair]
    return logits, caches


@needs_interpreter
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_interpreted_fused_decode_step_matches_the_layer_path(variant: str, gpu_path_on_cpu) -> None:
    """``FusedDecoder`` (norms in the linears' prologues, one-kernel Mamba step, activations in fc1's epilogue): two
    kernels per layer plus the Mamba step and attention, the same logits and caches as the layers' CUDA path (float32
    within 1e-5 relative, bf16 to its rounding), and float32 within the usual bound of the full forward."""
    calls = gpu_path_on_cpu
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(variant).to(dtype)
        layers_logits, layers_caches = _batch_one_run(model, fused=False)
        calls.clear()
        fused_logits, fused_caches = _batch_one_run(model, fused=True)
        pattern = model.config.layer_pattern
        assert calls.get("triton_fused_gemv", 0) == STEPS * 2 * len(pattern)
        assert calls.get("triton_decode", 0) == STEPS * pattern.count("M")
        assert calls.get("triton_attention", 0) == STEPS * pattern.count("*")
        assert calls.get("triton_add_norm", 0) == STEPS  # the final norm only
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        for step, (a, b) in enumerate(zip(fused_logits, layers_logits)):
            assert relative_error(a.float(), b.float()) <= bound, f"{dtype} step {step}"
        for index, (a, b) in enumerate(zip(fused_caches, layers_caches)):
            assert relative_error(a.float(), b.float()) <= bound, f"{dtype} cache {index}"
        if dtype == torch.float32:
            sequence = random_ids(model.config.vocab_size, 7, seed=1) + random_ids(model.config.vocab_size, STEPS,
                                                                                   seed=2)
            reference = full_logits(model, sequence)
            for step, logits in enumerate(fused_logits):
                assert relative_error(logits[0], reference[7 + step]) <= TOLERANCE


def test_fused_decoder_refuses_what_it_cannot_run(monkeypatch) -> None:
    """Each refusal names its reason (the runner then keeps the layer path); a supported model builds."""
    model = make_model("hybrid_rope_swiglu_bias")
    context = InferenceContext(model, max_batch_size=1, max_sequence_length=8)
    assert "not CUDA" in fused_decode.FusedDecoder.unsupported_reason(model)
    with pytest.raises(ValueError, match="FusedDecoder cannot run this model: .*not CUDA"):
        fused_decode.FusedDecoder(model, context)
    assert ModelRunner(model, max_batch_size=1, max_sequence_length=8).fused_decoder is None
    monkeypatch.setattr(fused_decode, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(fused_decode, "load_own_triton", lambda module_name, entry, what: None)
    from megatron_hybrid.layers import attention

    assert "attention is off" in fused_decode.FusedDecoder.unsupported_reason(model)
    monkeypatch.setattr(attention, "FUSED_DECODE_DEVICE_TYPES", ("cuda", "cpu"))
    assert fused_decode.FusedDecoder.unsupported_reason(model) is None
    model.train()
    assert "training" in fused_decode.FusedDecoder.unsupported_reason(model)
    model.eval()
    layer = model.decoder.layers["2"]
    layer.__class__ = _CustomMLPLayer  # an overridden forward: not a stock layer
    assert "stock layer" in fused_decode.FusedDecoder.unsupported_reason(model)
    layer.__class__ = MLPLayer
    wide = make_model("hybrid_rope_swiglu_bias", ffn_hidden_size=4100)
    assert "more than the fused GEMV's 4096" in fused_decode.FusedDecoder.unsupported_reason(wide)


# ------------------------------------------------------------------------------------------------ runner and engine


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "layers"])
def test_runner_takes_lists_or_tensors_and_decodes_greedy(lean: bool) -> None:
    model = make_model("hybrid_rope_swiglu_bias")
    prompts = torch.tensor([random_ids(model.config.vocab_size, 6, seed=i) for i in range(3)])
    results = []
    for kind in ("tensors", "lists", "greedy"):
        runner = ModelRunner(model, max_batch_size=4, max_sequence_length=16, lean_decode=lean)
        runner.prefill(0, prompts)
        tokens, positions = [4, 9, 2], [6, 6, 6]
        if kind == "tensors":
            results.append(runner.decode(torch.tensor(tokens), torch.tensor(positions), 7))
        elif kind == "lists":
            results.append(runner.decode(tokens, positions, 7))
        else:
            results.append(runner.decode_greedy(tokens, positions, 7))
        assert runner.context.decode_inputs[:, :3].tolist() == [tokens, positions]
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[2], greedy_tokens(results[0])) and results[2].dtype == torch.long


class _Event:
    """Stands in for a CUDA event on CPU (the staging path's synchronisation)."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def synchronize(self) -> None:
        self.log.append("synchronize")

    def record(self) -> None:
        self.log.append("record")


def test_staged_upload_writes_leading_rows_and_zeroes_the_rest() -> None:
    """The CUDA path's upload through the (pinned) staging buffer, emulated with a CPU buffer: waits for the last
    upload before writing, records after; ids and positions land in the leading rows, the other rows are zero."""
    model = make_model("hybrid_rope_swiglu_bias")
    runner = ModelRunner(model, max_batch_size=4, max_sequence_length=16, lean_decode=False)
    reference = ModelRunner(model, max_batch_size=4, max_sequence_length=16, lean_decode=False)
    runner._staging, runner._staged = torch.zeros(2, 4, dtype=torch.long), _Event()
    prompts = torch.tensor([random_ids(model.config.vocab_size, 5, seed=i) for i in range(3)])
    for r in (runner, reference):
        r.prefill(0, prompts)
        r.context.decode_inputs.fill_(7)
    logits = runner.decode([1, 2, 3], [5, 5, 5], 6)
    assert runner._staged.log == ["synchronize", "record"]
    assert runner.context.decode_inputs.tolist() == [[1, 2, 3, 0], [5, 5, 5, 0]]
    assert torch.equal(logits, reference.decode(torch.tensor([1, 2, 3]), torch.tensor([5, 5, 5]), 6))
    runner.decode_greedy([4], [6], 7)  # a smaller batch: the rows it leaves are zeroed too
    assert runner.context.decode_inputs.tolist() == [[4, 0, 0, 0], [6, 0, 0, 0]]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "layers"])
def test_engine_greedy_fast_path_gives_the_sampling_path_tokens(lean: bool) -> None:
    """All-greedy steps without log-probs take ``decode_greedy``; asking for log-probs takes ``sample_tokens``: the
    same tokens either way."""
    model = make_model("hybrid_rope_swiglu_bias", seed=2)
    prompts = [random_ids(model.config.vocab_size, n, seed=n) for n in (3, 8, 8, 5)]
    outputs = {}
    for logprobs in (False, True):
        engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=32, lean_decode=lean)
        calls = []
        original = engine.runner.decode_greedy

        def spy(*args, original=original, calls=calls):
            calls.append(1)
            return original(*args)

        engine.runner.decode_greedy = spy
        params = SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=logprobs)
        outputs[logprobs] = [o.token_ids for o in engine.generate(prompts, params)]
        assert bool(calls) is not logprobs
    assert outputs[False] == outputs[True]


class _PipelinedCpuRunner:
    """The pipelined greedy interface of a CUDA-graph ``ModelRunner`` (``decode_greedy_async``,
    ``decode_greedy_next``) emulated on CPU around a real runner: each step runs when it is queued, as on the GPU, and
    the queued step's inputs are the previous step's tokens at positions + 1, as the graphs feed them."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_inputs: tuple[list[int], list[int]] | None = None
        self.queued = 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _run(self, token_ids: list[int], positions: list[int]):
        tokens = self.runner.decode_greedy(token_ids, positions, max(positions) + 1).tolist()
        self.next_inputs = (tokens, [p + 1 for p in positions])
        return _Ready(tokens)

    def decode_greedy_async(self, token_ids, positions, attention_length):
        return self._run(list(token_ids), list(positions))

    def decode_greedy_next(self, batch: int):
        self.queued += 1
        tokens, positions = self.next_inputs
        return self._run(tokens[:batch], positions[:batch])


class _Ready:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def tolist(self) -> list[int]:
        return self.tokens


def test_pipelined_greedy_engine_gives_the_tokens_and_events_of_the_plain_one() -> None:
    """The engine's pipelined greedy steps (the step after the current one queued before its tokens are read), with
    requests ending by stop token and by length at different steps, a request admitted mid-run (continuous batching)
    and one aborted mid-run: every request's tokens, finish reason and event sequence equal the unpipelined engine's,
    and steps were indeed queued ahead."""
    model = make_model("hybrid_rope_swiglu_bias", seed=4)
    vocab = model.config.vocab_size
    prompts = [random_ids(vocab, n, seed=30 + n) for n in (3, 8, 5, 6)]
    plain = InferenceEngine(model, max_batch_size=3, max_sequence_length=40, lean_decode=False)
    # a stop token that the plain greedy run of request 0 produces at its 4th step
    probe = plain.generate([prompts[0]], SamplingParams(max_new_tokens=12, temperature=0.0))[0].token_ids
    stop = probe[3]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)),
        SamplingParams(max_new_tokens=5, temperature=0.0),
        SamplingParams(max_new_tokens=9, temperature=0.0),
        SamplingParams(max_new_tokens=7, temperature=0.0),
    ]
    runs = {}
    for pipelined in (False, True):
        engine = InferenceEngine(model, max_batch_size=3, max_sequence_length=40, lean_decode=False)
        if pipelined:
            engine.runner = _PipelinedCpuRunner(engine.runner)
            engine._pipelined = True
        events: dict[str, list[tuple[int, bool, str | None]]] = {}
        for index in range(3):
            engine.add_request(f"r{index}", prompts[index], params[index])
        steps = 0
        while engine.has_unfinished():
            for event in engine.step():
                events.setdefault(event.request_id, []).append((event.token_id, event.finished, event.finish_reason))
            steps += 1
            if steps == 2:
                engine.add_request("r3", prompts[3], params[3])  # admitted when a slot frees
            if steps == 3:
                engine.abort("r2")
        outputs = {rid: engine.pop_output(rid) for rid in ("r0", "r1", "r3")}
        runs[pipelined] = events, {rid: (o.token_ids, o.finish_reason) for rid, o in outputs.items()}
        if pipelined:
            assert engine.runner.queued > 0
    (events, outputs), (plain_events, plain_outputs) = runs[True], runs[False]
    assert outputs == plain_outputs
    assert {rid: events[rid] for rid in ("r0", "r1", "r3")} == {rid: plain_events[rid] for rid in ("r0", "r1", "r3")}
    assert plain_outputs["r0"][1] == "stop" and plain_outputs["r1"][1] == "length"
    # The aborted request: its tokens up to the abort are its greedy tokens (the pipelined engine may have read one
    # more step by then: a request that ended at step 3 made it read the step queued ahead), then the abort event.
    unaborted = plain.generate([prompts[2]], params[2])[0].token_ids
    for stream in (events["r2"], plain_events["r2"]):
        assert stream[-1] == (-1, True, "abort")
        assert [token for token, _, _ in stream[:-1]] == unaborted[: len(stream) - 1]
