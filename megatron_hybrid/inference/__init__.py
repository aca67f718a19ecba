"""Generation: state and KV caches, prefill / decode, sampling, continuous batching, CUDA graphs, tensor parallelism.

``InferenceEngine`` is the entry point (see ``engine``); ``InferenceContext`` is the cache object the model's forward
takes as ``inference_context``; ``run_tp_worker`` is the loop of the non-zero tensor-parallel ranks.
"""

from megatron_hybrid.inference.context import InferenceContext
from megatron_hybrid.inference.engine import GenerationOutput, InferenceEngine, TokenEvent
from megatron_hybrid.inference.model_runner import ModelRunner
from megatron_hybrid.inference.sampling import IncrementalDetokenizer, SamplingParams
from megatron_hybrid.inference.tp_worker import run_tp_worker

__all__ = [
    "GenerationOutput",
    "IncrementalDetokenizer",
    "InferenceContext",
    "InferenceEngine",
    "ModelRunner",
    "SamplingParams",
    "TokenEvent",
    "run_tp_worker",
]
