"""Command line of ``tools/run_text_generation_server.py``: Megatron-style flags -> model, tokenizer, engine, server.

Model sources (exactly one):

- ``--load DIR``: a training checkpoint (``megatron_hybrid.checkpoint.load_model_for_inference``); the model's
  hyper-parameters and tokenizer settings come from the checkpoint. Model flags given on the command line (as
  Megatron's example scripts do) are checked against it and a disagreement is an error naming every field, unless
  ``--use-checkpoint-args`` says to take the checkpoint's values and ignore the flags.
- ``--hf-model DIR``: a transformers NemotronH / Mamba2 directory (``megatron_hybrid.from_pretrained``); the
  tokenizer defaults to the directory's ``tokenizer.json``.
- ``--random-init``: random weights built from the model flags (smoke tests, benchmarks).

Megatron flags that only concern training or kernels Megatron picks (``--micro-batch-size``, ``--use-mcore-models``,
``--spec``, ``--use-flash-attn``, ``--transformer-impl``, ``--distributed-timeout-minutes``, ...) are accepted and
ignored so that Megatron command lines work unchanged; flags that would change the model in a way this framework
does not implement (``--normalization LayerNorm``, ``--apply-layernorm-1p``, pipeline parallelism) are errors.

Tensor parallelism: run under ``torchrun --nproc_per_node TP`` with ``--tensor-model-parallel-size TP``; every rank
builds its shard and an engine, rank 0 serves HTTP and the other ranks follow its engine steps
(``megatron_hybrid.inference.tp_worker.run_tp_worker``) until rank 0 closes its engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from megatron_hybrid.config import HybridConfig

__all__ = ["build_parser", "config_overrides_from_args", "main"]

log = logging.getLogger("megatron_hybrid.inference.server")

# Flags accepted for compatibility with Megatron-LM command lines and ignored (name -> nargs; 0 = store_true).
_IGNORED_FLAGS: dict[str, int | str] = {
    "--use-mcore-models": 0,
    "--use-flash-attn": 0,
    "--no-load-rng": 0,
    "--no-load-optim": 0,
    "--micro-batch-size": 1,
    "--global-batch-size": 1,
    "--transformer-impl": 1,
    "--attention-backend": 1,
    "--distributed-timeout-minutes": 1,
    "--spec": "+",
    "--return-log-probs": 0,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_text_generation_server.py",
        description="Serve a megatron_hybrid model over HTTP: Megatron's PUT /api, OpenAI's POST /v1/completions, "
        "GET /health.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model source (exactly one)")
    src.add_argument("--load", metavar="DIR", help="training checkpoint directory")
    src.add_argument("--hf-model", metavar="DIR", help="transformers NemotronH / Mamba2 directory")
    src.add_argument("--random-init", action="store_true", help="random weights from the model flags")
    src.add_argument("--use-checkpoint-args", action="store_true",
                     help="take the model hyper-parameters from the checkpoint and ignore model flags")

    m = p.add_argument_group("model (Megatron flag names; default: from the checkpoint)")
    S = argparse.SUPPRESS
    m.add_argument("--num-layers", type=int, default=S)
    m.add_argument("--hidden-size", type=int, default=S)
    m.add_argument("--ffn-hidden-size", type=int, default=S)
    m.add_argument("--num-attention-heads", type=int, default=S)
    m.add_argument("--group-query-attention", action="store_true", default=S)
    m.add_argument("--num-query-groups", type=int, default=S)
    m.add_argument("--kv-channels", type=int, default=S)
    m.add_argument("--hybrid-attention-ratio", type=float, default=S)
    m.add_argument("--hybrid-mlp-ratio", type=float, default=S)
    m.add_argument("--hybrid-override-pattern", default=S)
    m.add_argument("--hybrid-layer-pattern", default=S, help="newer Megatron name: the pattern also sets num-layers")
    m.add_argument("--position-embedding-type", choices=("none", "rope", "learned_absolute"), default=S)
    m.add_argument("--rotary-percent", type=float, default=S)
    m.add_argument("--rotary-base", type=float, default=S)
    m.add_argument("--max-position-embeddings", type=int, default=S)
    m.add_argument("--seq-length", type=int, default=S, help="default context length of the server")
    m.add_argument("--squared-relu", action="store_true", default=S)
    m.add_argument("--swiglu", action="store_true", default=S)
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=S)
    m.add_argument("--disable-bias-linear", action="store_true", default=S)
    m.add_argument("--add-bias-linear", action="store_true", default=S)
    m.add_argument("--normalization", default=S, help="RMSNorm only")
    m.add_argument("--apply-layernorm-1p", action="store_true", default=S)
    m.add_argument("--norm-epsilon", type=float, default=S)
    m.add_argument("--mamba-state-dim", type=int, default=S)
    m.add_argument("--mamba-head-dim", type=int, default=S)
    m.add_argument("--mamba-num-groups", type=int, default=S)
    m.add_argument("--mamba-num-heads", type=int, default=S)
    m.add_argument("--attention-dropout", type=float, default=S)
    m.add_argument("--hidden-dropout", type=float, default=S)
    m.add_argument("--init-method-std", type=float, default=S)

    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer-type", default=None,
                   help="HuggingFaceTokenizer | GPTSentencePieceTokenizer | GPT2BPETokenizer | NullTokenizer "
                   "(default: the checkpoint's, else guessed from --tokenizer-model)")
    t.add_argument("--tokenizer-model", default=None)
    t.add_argument("--vocab-file", default=None)
    t.add_argument("--merge-file", default=None)
    t.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    t.add_argument("--make-vocab-size-divisible-by", type=int, default=None)

    d = p.add_argument_group("parallelism and precision")
    d.add_argument("--tensor-model-parallel-size", type=int, default=1)
    d.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    d.add_argument("--context-parallel-size", type=int, default=1)
    d.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None)
    d.add_argument("--bf16", action="store_true")
    d.add_argument("--fp16", action="store_true")
    d.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    d.add_argument("--seed", type=int, default=1234, help="seed of --random-init weights")

    i = p.add_argument_group("inference")
    i.add_argument("--inference-max-batch-size", "--max-batch-size", dest="max_batch_size", type=int, default=16,
                   help="sequences decoded together (engine slots)")
    i.add_argument("--inference-max-seq-length", dest="max_seq_length", type=int, default=None,
                   help="context limit of prompt + generation (default: --seq-length, else the model's "
                   "max_position_embeddings)")
    i.add_argument("--cuda-graphs", "--enable-cuda-graph", dest="cuda_graphs", action="store_true",
                   help="decode with CUDA graphs (GPU only)")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--max-body-bytes", type=int, default=1024 * 1024)
    s.add_argument("--max-pending-requests", type=int, default=1024)
    s.add_argument("--model-name", default=None, help="the 'model' field of OpenAI answers")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    g = p.add_argument_group("Megatron flags accepted and ignored")
    for flag, nargs in _IGNORED_FLAGS.items():
        if nargs == 0:
            g.add_argument(flag, action="store_true", default=S, help=S)
        else:
            g.add_argument(flag, nargs=None if nargs == 1 else nargs, default=S, help=S)
    return p


def config_overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """HybridConfig fields the command line sets explicitly (flags left out are absent)."""
    a = vars(args)
    out: dict[str, Any] = {}
    simple = {
        "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
        "num_attention_heads": "num_attention_heads", "kv_channels": "kv_channels",
        "hybrid_attention_ratio": "hybrid_attention_ratio", "hybrid_mlp_ratio": "hybrid_mlp_ratio",
        "hybrid_override_pattern": "hybrid_override_pattern", "position_embedding_type": "position_embedding_type",
        "rotary_percent": "rotary_percent", "rotary_base": "rotary_base",
        "max_position_embeddings": "max_position_embeddings", "norm_epsilon": "norm_epsilon",
        "mamba_state_dim": "mamba_state_dim", "mamba_head_dim": "mamba_head_dim",
        "mamba_num_groups": "mamba_num_groups", "mamba_num_heads": "mamba_num_heads",
        "attention_dropout": "attention_dropout", "hidden_dropout": "hidden_dropout",
        "init_method_std": "init_method_std",
    }
    for flag, fld in simple.items():
        if flag in a:
            out[fld] = a[flag]
    if "hybrid_layer_pattern" in a:
        pattern = a["hybrid_layer_pattern"]
        out["hybrid_override_pattern"] = pattern
        out.setdefault("num_layers", len(pattern.replace("|", "")))
    if out.get("position_embedding_type") == "learned_absolute":
        raise SystemExit("error: --position-embedding-type learned_absolute is not supported (none or rope)")
    if "normalization" in a and a["normalization"] != "RMSNorm":
        raise SystemExit(f"error: --normalization {a['normalization']} is not supported (RMSNorm only)")
    if "apply_layernorm_1p" in a:
        raise SystemExit("error: --apply-layernorm-1p is not supported (the models use RMSNorm)")
    if "squared_relu" in a and "swiglu" in a:
        raise SystemExit("error: --squared-relu and --swiglu are mutually exclusive")
    if "squared_relu" in a:
        out["activation"] = "squared_relu"
    elif "swiglu" in a:
        out["activation"] = "swiglu"
    if "disable_bias_linear" in a and "add_bias_linear" in a:
        raise SystemExit("error: --disable-bias-linear and --add-bias-linear are mutually exclusive")
    if "disable_bias_linear" in a:
        out["add_bias_linear"] = False
    elif "add_bias_linear" in a:
        out["add_bias_linear"] = True
    if "untie_embeddings_and_output_weights" in a:
        out["untie_embeddings_and_output_weights"] = True
    # Megatron: --num-query-groups only counts with --group-query-attention; without it attention is multi-head.
    if "group_query_attention" in a and "num_query_groups" in a:
        out["num_query_groups"] = a["num_query_groups"]
    elif "group_query_attention" not in a and "num_attention_heads" in a:
        out["num_query_groups"] = a["num_attention_heads"]
    return out


# Fields that do not change what a trained model computes at inference: never a reason to refuse a checkpoint.
_TRAINING_ONLY_FIELDS = ("attention_dropout", "hidden_dropout", "init_method_std")
_LAYOUT_FIELDS = ("num_layers", "hybrid_attention_ratio", "hybrid_mlp_ratio", "hybrid_override_pattern")


def _check_against(config: HybridConfig, overrides: dict[str, Any], source: str) -> None:
    """Every explicitly given model flag must agree with the loaded model's configuration.

    The layer layout is compared as the resulting pattern (ratios and an explicit pattern can describe the same
    stack); dropout and init settings are not compared; every other field by value.
    """
    from megatron_hybrid.models.layer_pattern import allocate_layers

    problems = []
    layout = {k: overrides[k] for k in _LAYOUT_FIELDS if k in overrides}
    if layout:
        wanted = {k: layout.get(k, getattr(config, k)) for k in _LAYOUT_FIELDS}
        if "hybrid_override_pattern" not in layout and ("hybrid_attention_ratio" in layout
                                                         or "hybrid_mlp_ratio" in layout):
            wanted["hybrid_override_pattern"] = None
        try:
            pattern = allocate_layers(wanted["num_layers"], wanted["hybrid_attention_ratio"],
                                      wanted["hybrid_mlp_ratio"], wanted["hybrid_override_pattern"]).replace("|", "")
        except (ValueError, AssertionError) as e:
            pattern = f"<invalid: {e}>"
        if pattern != config.layer_pattern:
            flags = ", ".join(f"{k}={v!r}" for k, v in layout.items())
            problems.append(f"layer pattern: command line ({flags}) gives {pattern!r} vs {source} "
                            f"{config.layer_pattern!r}")
    for name, value in overrides.items():
        if name in _LAYOUT_FIELDS or name in _TRAINING_ONLY_FIELDS:
            continue
        have = getattr(config, name)
        if isinstance(value, float) or isinstance(have, float):
            same = have is not None and value is not None and abs(float(have) - float(value)) <= 1e-9 * max(
                1.0, abs(float(value)))
        else:
            same = have == value
        if not same:
            problems.append(f"{name}: command line {value!r} vs {source} {have!r}")
    if problems:
        raise SystemExit(
            "error: model flags disagree with the " + source + " (drop them, fix them, or pass --use-checkpoint-args "
            "to take the " + source + "'s values):\n  " + "\n  ".join(problems)
        )


def _params_dtype(args: argparse.Namespace) -> torch.dtype | None:
    if args.bf16 and args.fp16:
        raise SystemExit("error: --bf16 and --fp16 are mutually exclusive")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def _guess_tokenizer_type(model: str | None) -> str | None:
    if model is None:
        return None
    if model.endswith(".model"):
        return "GPTSentencePieceTokenizer"
    if os.path.isdir(model) or model.endswith(".json"):
        return "HuggingFaceTokenizer"
    return None


def _build_tokenizer(args: argparse.Namespace, saved: dict[str, Any] | None, tp: int, default_divisor: int) -> Any:
    from megatron_hybrid.tokenizers import build_tokenizer

    # Tokenizer flags on the command line replace the checkpoint's tokenizer settings as a whole (mixing a new
    # model file with the saved type or vocabulary files would build something nobody asked for).
    cli = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
           "vocab_file": args.vocab_file, "merge_file": args.merge_file, "vocab_size": args.vocab_size}
    chosen = cli if any(v is not None for v in cli.values()) or not saved else dict(saved)
    tok_type = chosen.get("tokenizer_type") or _guess_tokenizer_type(chosen.get("tokenizer_model"))
    if tok_type is None:
        raise SystemExit("error: no tokenizer: pass --tokenizer-type and --tokenizer-model (or --vocab-size with "
                         "--tokenizer-type NullTokenizer)")
    kwargs = {
        "tokenizer_model": chosen.get("tokenizer_model"),
        "vocab_file": chosen.get("vocab_file"),
        "merge_file": chosen.get("merge_file"),
        "vocab_size": chosen.get("vocab_size"),
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by
        or (saved or {}).get("make_vocab_size_divisible_by") or default_divisor,
        "tp_size": tp,
    }
    try:
        return build_tokenizer(tok_type, **kwargs)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: cannot build the {tok_type} tokenizer: {e}") from None


def _check_vocab(tokenizer: Any, config: HybridConfig) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}")


def _random_config(overrides: dict[str, Any], vocab_size: int, dtype: torch.dtype | None) -> HybridConfig:
    fields = {"activation": "gelu", **overrides}  # Megatron's MLP default is GeLU
    for need in ("num_layers", "hidden_size"):
        if need not in fields:
            raise SystemExit(f"error: --random-init needs --{need.replace('_', '-')}")
    fields.setdefault("num_attention_heads", 8)
    fields.setdefault("num_query_groups", fields["num_attention_heads"])
    return HybridConfig(vocab_size=vocab_size, params_dtype=dtype or torch.float32, **fields)


def _load_model(args: argparse.Namespace, overrides: dict[str, Any], groups: Any, tp: int, tp_rank: int
                ) -> tuple[torch.nn.Module, Any]:
    """(model on CPU in eval mode, tokenizer)."""
    from megatron_hybrid.models.mamba_model import MambaModel
    from megatron_hybrid.parallel.sharding import shard_state_dict

    dtype = _params_dtype(args)
    if args.load:
        try:
            from megatron_hybrid.checkpoint import load_model_for_inference
        except ImportError as e:
            raise SystemExit(f"error: --load needs megatron_hybrid.checkpoint ({e})") from None
        try:
            model, config, tokenizer_args = load_model_for_inference(args.load, groups=groups, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise SystemExit(f"error: cannot load the checkpoint {args.load}: {e}") from None
        if not args.use_checkpoint_args:
            _check_against(config, overrides, "checkpoint")
        tokenizer = _build_tokenizer(args, tokenizer_args, tp, 128)
        _check_vocab(tokenizer, config)
        return model.eval(), tokenizer

    if args.hf_model:
        import megatron_hybrid

        full = megatron_hybrid.from_pretrained(args.hf_model, dtype=dtype)
        config = full.config
        if not args.use_checkpoint_args:
            _check_against(config, overrides, "HF model")
        if args.tokenizer_model is None and args.tokenizer_type is None and os.path.isfile(
            os.path.join(args.hf_model, "tokenizer.json")
        ):
            args.tokenizer_model, args.tokenizer_type = args.hf_model, "HuggingFaceTokenizer"
        tokenizer = _build_tokenizer(args, None, tp, 1)
        _check_vocab(tokenizer, config)
        if tp == 1:
            return full.eval(), tokenizer
        sharded = MambaModel(config, groups)
        shard_state_dict(sharded, full.state_dict(), tp_rank, tp)
        return sharded.eval(), tokenizer

    # --random-init
    tokenizer = _build_tokenizer(args, None, tp, 128)
    config = _random_config(overrides, tokenizer.vocab_size, dtype).replace(
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by or 128)
    config = config.replace(make_vocab_size_divisible_by=config.make_vocab_size_divisible_by * tp)
    torch.manual_seed(args.seed)
    full = MambaModel(config)
    if tp == 1:
        return full.eval(), tokenizer
    sharded = MambaModel(config, groups)
    shard_state_dict(sharded, full.state_dict(), tp_rank, tp)
    return sharded.eval(), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sources = [bool(args.load), bool(args.hf_model), args.random_init]
    if sum(sources) != 1:
        raise SystemExit("error: give exactly one of --load DIR, --hf-model DIR, --random-init")
    if args.pipeline_model_parallel_size != 1 or args.context_parallel_size != 1:
        raise SystemExit("error: text generation supports tensor parallelism only (pipeline and context parallel "
                         "sizes must be 1)")
    overrides = config_overrides_from_args(args)
    tp = args.tensor_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world != tp:
        raise SystemExit(f"error: --tensor-model-parallel-size {tp} needs exactly {tp} processes (torchrun "
                         f"--nproc_per_node {tp}); this run has {world}")

    groups = None
    rank = 0
    if tp > 1:
        from megatron_hybrid.parallel.state import init_distributed, initialize_parallel_groups

        init_distributed(args.distributed_backend, timeout=timedelta(minutes=30))
        groups = initialize_parallel_groups(tp=tp)
        rank = torch.distributed.get_rank()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and tp > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    model, tokenizer = _load_model(args, overrides, groups, tp, rank)
    model = model.to(device)
    config = model.config
    context = args.max_seq_length or vars(args).get("seq_length") or config.max_position_embeddings

    if rank != 0:
        from megatron_hybrid.inference.tp_worker import run_tp_worker

        # torchrun forwards SIGINT / SIGTERM to every rank; a worker waits for rank 0 to shut down gracefully and
        # release it (a worker killed mid-broadcast would leave rank 0 hanging in a collective).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_tp_worker(model)  # returns when rank 0 closes its engine
        return 0

    from megatron_hybrid.inference.engine import InferenceEngine

    engine = InferenceEngine(model, tokenizer, max_batch_size=args.max_batch_size, max_sequence_length=context,
                             use_cuda_graphs=args.cuda_graphs)

    from megatron_hybrid.inference.server import ServerConfig, TextGenerationService, create_app, run_server

    name = args.model_name or os.path.basename(os.path.normpath(args.load or args.hf_model or "random-init"))
    service = TextGenerationService(
        engine, tokenizer,
        ServerConfig(context_length=context, model_name=name, max_body_bytes=args.max_body_bytes,
                     max_pending_requests=args.max_pending_requests),
    )
    log.info("model %s: pattern %s, %d parameters on %s, tp %d, context %d, %d slots; serving on http://%s:%d",
             name, config.layer_pattern, sum(p.numel() for p in model.parameters()), device, tp, context,
             args.max_batch_size, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server has no authentication; anyone who can reach the port can use it",
                    args.host)
    # The app's shutdown closes the engine (releasing tensor-parallel workers); the finally covers a failed start.
    try:
        run_server(create_app(service), args.host, args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
