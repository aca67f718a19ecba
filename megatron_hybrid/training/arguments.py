"""Run configuration: dataclasses are the source of truth, the Megatron-style command line is derived from them.

Why derived: a flag, its type, default, choices and help live in exactly one place (a dataclass field and its
metadata), so the CLI, the YAML file, the JSON copy saved in every checkpoint and the Python API can never disagree.

Three dataclasses hold a run's settings, plus the model's own :class:`~megatron_hybrid.config.HybridConfig`:

* :class:`TrainingConfig`: batch sizes, iterations, optimizer, LR schedule, data, tokenizer, logging, checkpoints;
* :class:`ParallelConfig`: tensor / pipeline / context parallel sizes, sequence parallelism, distributed optimizer;
* :class:`ModelFlags`: the Megatron model flags that are not a HybridConfig field (``--group-query-attention``,
  ``--normalization``, ``--model-preset``);
* HybridConfig fields become flags through :data:`HYBRID_CONFIG_FLAGS` (that module is not ours to annotate).

Flag names, meanings and, where they differ from HybridConfig's, defaults are Megatron-LM's, so a Megatron command
line (e.g. the one of ``examples/mamba/train.sh``) builds the same model and run. Differences are listed in
:data:`MEGATRON_DIFFERENCES`.

Precedence: dataclass defaults < ``--model-preset`` < ``--yaml-cfg`` file < command line. Unknown flags (or YAML
keys) and contradictory settings raise :class:`ConfigError` naming them.

Python use (``make demo`` and tests)::

    run = parse_args(["--num-layers", "4", ...])          # exactly the CLI
    run = make_run_config(num_layers=4, hidden_size=64)   # same thing from keyword arguments (dest names)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.pipeline_stage import stage_layer_ranges

__all__ = [
    "HYBRID_CONFIG_FLAGS",
    "MEGATRON_DIFFERENCES",
    "ConfigError",
    "ModelFlags",
    "ParallelConfig",
    "ResolvedRun",
    "RunConfig",
    "TrainingConfig",
    "build_parser",
    "cli_field",
    "make_run_config",
    "parse_args",
    "resolve",
    "world_size_from_env",
]


class ConfigError(ValueError):
    """Invalid, unknown or contradictory settings; the message names every offending flag."""


# ----------------------------------------------------------------------------------------------------------------
# The generic dataclass -> argparse deriver
# ----------------------------------------------------------------------------------------------------------------

_CLI_KEY = "cli"


def cli_field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    switches: Mapping[str, Any] | None = None,
    nargs: str | int | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    cli: bool = True,
) -> Any:
    """A dataclass field whose metadata describes its command-line flag.

    ``flag`` defaults to ``--field-name``. A bool field becomes ``store_true`` on ``flag`` when its default is False;
    ``switches`` maps extra option strings to the constant they store (``{"--disable-bias-linear": False}``), which is
    how a True-by-default bool or a choice shortcut (``--swiglu``) is spelled. ``cli=False`` keeps a field off the
    command line (it stays settable from YAML and Python).
    """
    meta = {
        _CLI_KEY: _flag_spec(
            help=help, flag=flag, aliases=aliases, choices=choices, switches=switches, nargs=nargs, metavar=metavar,
            cli=cli,
        )
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _flag_spec(
    *,
    help: str = "",
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    switches: Mapping[str, Any] | None = None,
    nargs: str | int | None = None,
    metavar: str | None = None,
    cli: bool = True,
    default: Any = dataclasses.MISSING,
) -> dict[str, Any]:
    return {
        "help": help,
        "flag": flag,
        "aliases": tuple(aliases),
        "choices": tuple(choices) if choices is not None else None,
        "switches": dict(switches or {}),
        "nargs": nargs,
        "metavar": metavar,
        "cli": cli,
        "default": default,  # only used by external overrides (HYBRID_CONFIG_FLAGS): the CLI default
    }


@dataclass(frozen=True)
class _Option:
    """One derived option: where its value goes and how a string becomes that value."""

    dest: str
    owner: str  # "model" | "model_flags" | "training" | "parallel"
    main_flags: tuple[str, ...]  # option strings that take a value (or set True for a bool)
    switches: dict[str, Any]  # option strings that store a constant
    convert: Any  # callable str -> element value (None for bools)
    nargs: str | int | None
    choices: tuple[Any, ...] | None
    default: Any
    is_bool: bool
    help: str
    metavar: str | None

    @property
    def flags(self) -> tuple[str, ...]:
        return self.main_flags + tuple(self.switches)

    @property
    def display(self) -> str:
        """How messages name this setting: its first flag, else the dest."""
        flags = self.flags
        return flags[0] if flags else self.dest


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _converter_for(tp: Any) -> tuple[Any, str | int | None, bool]:
    """(element converter, nargs, is_bool) for a field type."""
    tp = _unwrap_optional(tp)
    if tp is bool:
        return None, None, True
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return args[0], len(args), False
    if origin is list:
        (arg,) = typing.get_args(tp)
        return arg, "*", False
    if tp in (int, float, str):
        return tp, None, False
    raise TypeError(f"cannot derive a command-line flag for type {tp!r}")


def _derive_options(cls: type, owner: str, overrides: Mapping[str, dict[str, Any]] | None = None,
                    exclude: Iterable[str] = (), auto: bool = False) -> list[_Option]:
    """The options of dataclass ``cls``: field metadata (or ``overrides[name]``) gives flag, help, choices.

    ``auto``: a field without a description still gets a plain ``--field-name`` flag (used for HybridConfig, so a
    field the model gains later is settable at once); otherwise it is an error.
    """
    hints = typing.get_type_hints(cls)
    excluded = set(exclude)
    options = []
    for f in dataclasses.fields(cls):
        if f.name in excluded:
            continue
        spec = (overrides or {}).get(f.name) or f.metadata.get(_CLI_KEY)
        if spec is None and auto:
            spec = _flag_spec()
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no command-line description (cli_field metadata)")
        convert, nargs, is_bool = _converter_for(hints[f.name])
        if spec["nargs"] is not None:
            nargs = spec["nargs"]
        if spec["default"] is not dataclasses.MISSING:
            default = spec["default"]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None  # required: checked after parsing, so YAML / presets can supply it
        flags: list[str] = []
        if spec["cli"]:
            main = spec["flag"] or "--" + f.name.replace("_", "-")
            if not (is_bool and default is True):  # a True-default bool is only spelled by its switches
                flags.append(main)
            flags.extend(spec["aliases"])
        options.append(
            _Option(
                dest=f.name,
                owner=owner,
                main_flags=tuple(flags),
                switches=dict(spec["switches"]) if spec["cli"] else {},
                convert=convert,
                nargs=nargs,
                choices=spec["choices"],
                default=default,
                is_bool=is_bool,
                help=spec["help"],
                metavar=spec["metavar"],
            )
        )
    return options


def _add_to_parser(group: argparse._ArgumentGroup, option: _Option, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else option.default
    if option.main_flags:
        kwargs: dict[str, Any] = {"dest": option.dest, "default": default, "help": option.help or None}
        if option.is_bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = option.convert
            if option.nargs is not None:
                kwargs["nargs"] = option.nargs
            if option.choices is not None:
                kwargs["choices"] = option.choices
            if option.metavar:
                kwargs["metavar"] = option.metavar
        group.add_argument(*option.main_flags, **kwargs)
    for switch, const in option.switches.items():
        text = f"sets {option.dest} to {const!r}"
        if not option.main_flags and option.help:
            text += f" ({option.help})"
        group.add_argument(switch, dest=option.dest, action="store_const", const=const, default=default, help=text)


# ----------------------------------------------------------------------------------------------------------------
# The configuration dataclasses
# ----------------------------------------------------------------------------------------------------------------

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer")


@dataclass
class TrainingConfig:
    """Everything about a run that is neither the model nor the parallel layout (Megatron flag names)."""

    # -- batch and length
    micro_batch_size: int = cli_field(1, "batch size of one forward/backward pass per data-parallel rank")
    global_batch_size: int | None = cli_field(
        None, "samples per optimizer step = micro x data-parallel x accumulation steps (default: micro x dp)")
    seq_length: int | None = cli_field(None, "tokens per sample (required)")
    train_iters: int | None = cli_field(None, "optimizer steps to train for (or --train-samples)")
    train_samples: int | None = cli_field(None, "samples to train for; iterations = train_samples // global batch")
    exit_interval: int | None = cli_field(None, "stop (after saving) when the iteration is a multiple of this")
    seed: int = cli_field(1234, "random seed: weights, data order, dropout")
    # -- optimizer
    optimizer: str = cli_field("adam", "adam = AdamW (decoupled weight decay), as in Megatron", choices=("adam",))
    lr: float | None = cli_field(None, "peak learning rate (required)")
    min_lr: float = cli_field(0.0, "learning rate floor of the decay")
    lr_decay_style: str = cli_field("linear", "learning-rate decay after warmup", choices=LR_DECAY_STYLES)
    lr_decay_iters: int | None = cli_field(None, "iterations to decay over (default: --train-iters)")
    lr_decay_samples: int | None = cli_field(None, "samples to decay over (default: --train-samples)")
    lr_warmup_fraction: float | None = cli_field(None, "warmup length as a fraction of the decay length")
    lr_warmup_iters: int = cli_field(0, "linear warmup iterations")
    lr_warmup_samples: int = cli_field(0, "linear warmup samples")
    lr_warmup_init: float = cli_field(0.0, "learning rate at the start of warmup")
    lr_wsd_decay_style: str = cli_field("exponential", "annealing shape of the WSD schedule", choices=WSD_DECAY_STYLES)
    lr_wsd_decay_iters: int | None = cli_field(None, "WSD: iterations of the final annealing phase")
    lr_wsd_decay_samples: int | None = cli_field(None, "WSD: samples of the final annealing phase")
    weight_decay: float = cli_field(0.01, "decoupled weight decay (not applied to norms, biases, A_log, D, dt_bias)")
    start_weight_decay: float | None = cli_field(None, "weight decay at the start (with --weight-decay-incr-style)")
    end_weight_decay: float | None = cli_field(None, "weight decay at the end (with --weight-decay-incr-style)")
    weight_decay_incr_style: str = cli_field("constant", "weight decay increment shape", choices=WD_INCR_STYLES)
    clip_grad: float = cli_field(1.0, "global gradient-norm clipping threshold (0 disables clipping)")
    adam_beta1: float = cli_field(0.9, "Adam beta1")
    adam_beta2: float = cli_field(0.999, "Adam beta2")
    adam_eps: float = cli_field(1e-8, "Adam epsilon")
    max_consecutive_nan_skips: int = cli_field(
        5, "a step whose loss or gradient norm is NaN/Inf is skipped; abort after this many in a row")
    # -- mixed precision
    bf16: bool = cli_field(False, "bf16 compute (autocast) with fp32 master weights and optimizer states")
    fp16: bool = cli_field(False, "not supported (use --bf16); accepted only to give a clear error")
    # -- performance
    enable_cuda_graph: bool = cli_field(
        False, "run each hybrid layer's forward and backward as a CUDA graph replay (captured at the first step; "
               "CUDA only, tensor- and pipeline-parallel size 1)")
    # -- data
    data_path: list[str] | None = cli_field(None, "prefix, or weighted blend 'w1 prefix1 w2 prefix2 ...'")
    split: str = cli_field("969,30,1", "train,valid,test proportions of the documents, e.g. 99,1,0")
    train_data_path: list[str] | None = cli_field(None, "train blend (instead of --data-path + --split)")
    valid_data_path: list[str] | None = cli_field(None, "validation blend")
    test_data_path: list[str] | None = cli_field(None, "test blend")
    data_cache_path: str | None = cli_field(None, "directory of the cached sample indices (default: next to data)")
    mock_data: bool = cli_field(False, "synthetic random tokens instead of --data-path (benchmarks, smoke tests)")
    num_workers: int = cli_field(0, "DataLoader worker processes (Megatron's default is 2)")
    dataloader_type: str = cli_field("single", "single: sequential sampler; cyclic: shuffled per epoch",
                                     choices=("single", "cyclic"))
    reset_position_ids: bool = cli_field(False, "restart position ids after every end-of-document token")
    reset_attention_mask: bool = cli_field(
        False, "no attention, convolution or SSM state across documents of a packed sample (through seq_idx)")
    eod_mask_loss: bool = cli_field(False, "no loss on end-of-document tokens")
    mmap_bin_files: bool = cli_field(True, "", switches={"--no-mmap-bin-files": False})
    create_attention_mask_in_dataloader: bool = cli_field(
        True, "no effect here (no dense masks are ever built); accepted for Megatron compatibility",
        switches={"--no-create-attention-mask-in-dataloader": False})
    # -- tokenizer
    tokenizer_type: str | None = cli_field(None, "tokenizer kind", choices=TOKENIZER_TYPES)
    tokenizer_model: str | None = cli_field(None, "tokenizer.json / its directory, or a sentencepiece .model")
    vocab_file: str | None = cli_field(None, "GPT2BPETokenizer vocab.json")
    merge_file: str | None = cli_field(None, "GPT2BPETokenizer merges.txt")
    vocab_size: int | None = cli_field(None, "NullTokenizer vocabulary size (ids 0..V-1, eod = V-1)")
    make_vocab_size_divisible_by: int = cli_field(
        128, "pad the vocabulary to a multiple of this x tensor-parallel size")
    # -- checkpoints
    save: str | None = cli_field(None, "checkpoint directory to save to")
    load: str | None = cli_field(None, "checkpoint directory to resume from (nothing there: start from scratch)")
    save_interval: int | None = cli_field(None, "iterations between checkpoints (plus one at the end)")
    keep_last_n: int | None = cli_field(None, "keep only the newest N checkpoints in --save")
    ckpt_step: int | None = cli_field(None, "load this iteration instead of the latest")
    no_save_optim: bool = cli_field(False, "do not save optimizer states")
    no_save_rng: bool = cli_field(False, "do not save RNG states")
    no_load_optim: bool = cli_field(False, "do not load optimizer states")
    no_load_rng: bool = cli_field(False, "do not load RNG states")
    finetune: bool = cli_field(False, "load weights only; iteration, optimizer, scheduler and data start over")
    exit_on_missing_checkpoint: bool = cli_field(False, "fail if --load holds no checkpoint")
    ckpt_verify: bool = cli_field(True, "", switches={"--no-ckpt-verify": False})
    # -- logging and evaluation
    log_interval: int = cli_field(100, "iterations between log lines")
    eval_interval: int = cli_field(1000, "iterations between validation runs")
    eval_iters: int = cli_field(100, "global batches per validation run (0: no validation)")
    tensorboard_dir: str | None = cli_field(None, "write TensorBoard scalars here (needs the tensorboard package)")
    metrics_jsonl: str | None = cli_field(None, "JSON-lines metrics file (default: <save>/metrics.jsonl)")
    peak_tflops: float | None = cli_field(None, "peak dense TFLOP/s per device for MFU (default: device table)")
    # -- accepted for Megatron compatibility, no effect here
    use_mcore_models: bool = cli_field(False, "no effect (there is only one implementation); Megatron compatibility")
    spec: list[str] | None = cli_field(None, "no effect (layer specs are fixed here); Megatron compatibility")


@dataclass
class ParallelConfig:
    """Parallel layout of a run (Megatron flag names). World size = tp x cp x dp x pp."""

    tensor_model_parallel_size: int = cli_field(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = cli_field(
        1, "pipeline-parallel size: layers split at the '|' of --hybrid-override-pattern, else evenly; "
           "non-interleaved 1F1B schedule")
    context_parallel_size: int = cli_field(1, "context-parallel size (only 1: not implemented)")
    sequence_parallel: bool = cli_field(False, "split norms/dropout activations along the sequence over TP ranks")
    use_distributed_optimizer: bool = cli_field(
        False, "shard optimizer states over data-parallel ranks (ZeRO-1, by whole parameters)")
    overlap_grad_reduce: bool = cli_field(False, "accepted; gradients are all-reduced after accumulation")
    overlap_param_gather: bool = cli_field(False, "accepted; parameters are broadcast after the step")
    distributed_backend: str | None = cli_field(
        None, "torch.distributed backend (default: nccl on CUDA, else gloo)", choices=("nccl", "gloo"))
    distributed_timeout_minutes: int = cli_field(10, "timeout of collectives")


@dataclass
class ModelFlags:
    """Megatron model flags that are not HybridConfig fields."""

    model_preset: str | None = cli_field(
        None, "start from a named model (megatron_hybrid.models.presets: tiny, cpu-bench, 800M, 8B); "
              "flags and YAML override its fields")
    group_query_attention: bool = cli_field(False, "use --num-query-groups key/value heads (else one per head)")
    normalization: str = cli_field("RMSNorm", "only RMSNorm is implemented (Megatron's default is LayerNorm)",
                                   choices=("LayerNorm", "RMSNorm"))
    yaml_cfg: str | None = cli_field(None, "YAML file with the same settings (keys = flag names); CLI overrides it")


def _spec(help: str, **kw: Any) -> dict[str, Any]:
    return _flag_spec(help=help, **kw)


# HybridConfig fields as flags. ``default=`` marks a Megatron default that differs from HybridConfig's.
HYBRID_CONFIG_FLAGS: dict[str, dict[str, Any]] = {
    "num_layers": _spec("number of layers of the hybrid stack (required unless a pattern or preset gives it)"),
    "hidden_size": _spec("model width (required)"),
    "hybrid_attention_ratio": _spec("fraction of layers that are attention"),
    "hybrid_mlp_ratio": _spec("fraction of layers that are MLP"),
    "hybrid_override_pattern": _spec("explicit layer pattern of M (Mamba), * (attention), - (MLP)"),
    "num_attention_heads": _spec("query heads of attention layers"),
    "num_query_groups": _spec("key/value heads (with --group-query-attention)"),
    "kv_channels": _spec("attention head dim (default hidden / heads)"),
    "position_embedding_type": _spec("position embedding of attention layers: none or rope"),
    "rotary_percent": _spec("fraction of the head dim that is rotated"),
    "rotary_base": _spec("RoPE base", flag="--rotary-base"),
    "max_position_embeddings": _spec("longest sequence the model is meant for"),
    "attention_dropout": _spec("dropout on attention probabilities", default=0.1),
    "ffn_hidden_size": _spec("MLP inner width (default 4 x hidden)"),
    "activation": _spec("MLP activation (Megatron's default is gelu)", choices=("squared_relu", "swiglu", "gelu"),
                        switches={"--swiglu": "swiglu", "--squared-relu": "squared_relu"}, default="gelu"),
    "add_bias_linear": _spec("biases in attention / MLP linear layers (Megatron's default is on)", default=True,
                             switches={"--disable-bias-linear": False, "--add-bias-linear": True}, flag=None),
    "mamba_state_dim": _spec("SSM state size N"),
    "mamba_head_dim": _spec("Mamba head dim P"),
    "mamba_num_groups": _spec("B/C groups G"),
    "mamba_num_heads": _spec("Mamba heads (default expand x hidden / head dim)"),
    "mamba_expand": _spec("Mamba inner width = expand x hidden"),
    "mamba_conv_kernel": _spec("depthwise convolution width"),
    "mamba_chunk_size": _spec("SSD chunk length"),
    "mamba_conv_bias": _spec("", switches={"--no-mamba-conv-bias": False}),
    "mamba_A_init_range": _spec("A initialised uniformly in [low, high]", flag="--mamba-a-init-range",
                                metavar="X"),
    "mamba_dt_min": _spec("dt initialisation range low"),
    "mamba_dt_max": _spec("dt initialisation range high"),
    "mamba_dt_init_floor": _spec("dt initialisation floor"),
    "mamba_dt_limit": _spec("clamp of dt during the scan", metavar="X"),
    "norm_epsilon": _spec("RMSNorm epsilon"),
    "residual_in_fp32": _spec("keep the residual stream in fp32", flag="--fp32-residual-connection"),
    "hidden_dropout": _spec("dropout on the residual branches", default=0.1),
    "untie_embeddings_and_output_weights": _spec("separate output layer instead of the embedding matrix"),
    "init_method_std": _spec("std of the normal weight initialisation"),
}
# Set by training from the tokenizer and the parallel layout, never flags.
_HYBRID_NOT_FLAGS = ("vocab_size", "params_dtype", "sequence_parallel", "make_vocab_size_divisible_by")

MEGATRON_DIFFERENCES = """\
Model defaults are Megatron-LM's where they differ from HybridConfig's (gelu MLP, linear biases, dropout 0.1):
a Megatron command line builds the same model. Defaults that differ from Megatron-LM:
--normalization RMSNorm (LayerNorm is not implemented), --position-embedding-type none (learned_absolute is not
implemented), --num-workers 0, --split 969,30,1.
The loss is averaged per token over the whole global batch (Megatron's --calculate-per-token-loss), so gradient
accumulation and data parallelism give the same update as one big batch. Validation always uses the same first
--eval-iters global batches of the validation split, so successive validation losses are comparable. The logged lr
is the one applied at that iteration. --overlap-grad-reduce / --overlap-param-gather / --use-mcore-models / --spec /
--no-create-attention-mask-in-dataloader are accepted without effect.
"""

_EXCLUSIVE = (
    ("train_iters", "train_samples"),
    ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction"),
    ("lr_decay_iters", "lr_decay_samples"),
    ("lr_wsd_decay_iters", "lr_wsd_decay_samples"),
    ("data_path", "mock_data"),
)
_ITERATION_BASED = ("lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")
_SAMPLE_BASED = ("lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")


def _all_options() -> list[_Option]:
    options = (
        _derive_options(ModelFlags, "model_flags")
        + _derive_options(HybridConfig, "model", HYBRID_CONFIG_FLAGS, exclude=_HYBRID_NOT_FLAGS, auto=True)
        + _derive_options(TrainingConfig, "training")
        + _derive_options(ParallelConfig, "parallel")
    )
    seen: dict[str, str] = {}
    for option in options:
        if option.dest in seen:
            raise TypeError(f"field {option.dest!r} is defined by both {seen[option.dest]} and {option.owner}")
        seen[option.dest] = option.owner
    return options


_OPTIONS: list[_Option] | None = None


def _options() -> list[_Option]:
    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = _all_options()
    return _OPTIONS


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------

_GROUP_TITLES = {
    "model_flags": "model (Megatron flags without a HybridConfig field)",
    "model": "model (HybridConfig)",
    "training": "training, data, tokenizer, logging, checkpoints",
    "parallel": "parallelism",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks and shows every default."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so the Python API can catch it."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise ConfigError(message)


def build_parser(suppress_defaults: bool = False, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser derived from the dataclasses (``--help`` lists every flag by group)."""
    parser = _Parser(
        prog=prog,
        description="Pretrain a hybrid Mamba-2 / attention language model (Megatron-LM flags).",
        epilog=MEGATRON_DIFFERENCES,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    groups = {owner: parser.add_argument_group(title) for owner, title in _GROUP_TITLES.items()}
    for option in _options():
        _add_to_parser(groups[option.owner], option, suppress_defaults)
    return parser


def _all_flag_strings() -> list[str]:
    return [flag for option in _options() for flag in option.flags]


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _unknown_flags_message(unknown: Sequence[str]) -> str:
    flags = _all_flag_strings()
    names = [u for u in unknown if u.startswith("-")] or list(unknown)
    parts = [f"{u.split('=')[0]}{_suggest(u.split('=')[0], flags)}" for u in names]
    return "unrecognized arguments: " + ", ".join(parts)


def _lookup() -> tuple[dict[str, _Option], dict[str, tuple[_Option, Any]]]:
    """dest -> option, and normalised switch name -> (option, constant)."""
    by_dest = {o.dest: o for o in _options()}
    by_switch = {}
    for o in _options():
        for switch, const in o.switches.items():
            by_switch[_normalise_key(switch)] = (o, const)
        for flag in o.main_flags:
            by_switch.setdefault(_normalise_key(flag), (o, _MAIN_FLAG))
    return by_dest, by_switch


_MAIN_FLAG = object()


def _normalise_key(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _convert_value(option: _Option, value: Any, where: str) -> Any:
    """A YAML / keyword value -> the field's type (strings go through the same converter as the CLI)."""
    if value is None:
        return None
    try:
        if option.is_bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if option.nargs is not None:
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, (list, tuple)):
                value = [value]
            items = [option.convert(v) if isinstance(v, str) else v for v in value]
            if isinstance(option.nargs, int) and len(items) != option.nargs:
                raise ValueError(f"expected {option.nargs} values, got {len(items)}")
            result: Any = tuple(items) if isinstance(option.nargs, int) else [str(v) for v in items] \
                if option.convert is str else items
        elif isinstance(value, str) and option.convert is not str:
            result = option.convert(value)
        elif option.convert is float and isinstance(value, int) and not isinstance(value, bool):
            result = float(value)
        elif option.convert is str and not isinstance(value, str):
            result = str(value)
        else:
            result = value
        if option.convert is int and (isinstance(result, bool) or not isinstance(result, int)):
            raise ValueError(f"expected an integer, got {value!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value for {option.display}: {exc}") from None
    if option.choices is not None and result not in option.choices:
        raise ConfigError(f"{where}: {option.display} must be one of {', '.join(map(str, option.choices))}, "
                          f"got {result!r}")
    return result


def _values_from_mapping(mapping: Mapping[str, Any], where: str) -> dict[str, Any]:
    """dest -> value from a YAML mapping or keyword arguments (dest names, flag names or switch names)."""
    by_dest, by_switch = _lookup()
    values: dict[str, Any] = {}
    unknown: list[str] = []

    def visit(items: Mapping[str, Any]) -> None:
        for raw_key, value in items.items():
            key = _normalise_key(raw_key)
            if key in by_dest:
                values[key] = _convert_value(by_dest[key], value, where)
            elif key in by_switch:
                option, const = by_switch[key]
                if const is _MAIN_FLAG:
                    values[option.dest] = _convert_value(option, value, where)
                elif value is True:
                    values[option.dest] = const
                elif value not in (False, None):
                    raise ConfigError(f"{where}: {raw_key} is a switch; set it to true (or leave it out)")
            elif isinstance(value, Mapping):
                visit(value)  # a section ("model:", "training:", ...): its keys are settings
            else:
                unknown.append(str(raw_key))

    visit(mapping)
    if unknown:
        candidates = list(by_dest) + list(by_switch)
        details = ", ".join(f"{u}{_suggest(_normalise_key(u), candidates)}" for u in unknown)
        raise ConfigError(f"{where}: unknown setting(s): {details}")
    return values


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a core dependency (pyproject.toml)
        raise ConfigError("--yaml-cfg needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--yaml-cfg {path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--yaml-cfg {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--yaml-cfg {path}: expected a mapping of settings, got {type(data).__name__}")
    values = _values_from_mapping(data, f"--yaml-cfg {path}")
    values.pop("yaml_cfg", None)
    return values


def _preset_values(name: str) -> dict[str, Any]:
    from megatron_hybrid.models.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"--model-preset {name!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]()
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(HybridConfig)
              if f.name not in _HYBRID_NOT_FLAGS}
    values["group_query_attention"] = config.num_query_groups != config.num_attention_heads
    return values


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse a Megatron-style command line (``sys.argv[1:]`` by default) into a validated :class:`RunConfig`.

    Raises :class:`ConfigError` (``--help`` raises SystemExit as usual).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(["--help"])  # prints the help with defaults, exits
    probe = build_parser(suppress_defaults=True)
    namespace, unknown = probe.parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_flags_message(unknown))
    cli = vars(namespace)
    return _assemble(cli_values=cli, python_values={})


def make_run_config(**settings: Any) -> RunConfig:
    """A :class:`RunConfig` from keyword arguments named like the flags' dests (``num_layers=4``, ``lr=1e-3``).

    Same defaults, presets, YAML (``yaml_cfg=``) and validation as :func:`parse_args`; these values win over YAML.
    """
    return _assemble(cli_values={}, python_values=_values_from_mapping(settings, "make_run_config"))


def _assemble(cli_values: dict[str, Any], python_values: dict[str, Any]) -> RunConfig:
    yaml_path = python_values.get("yaml_cfg", cli_values.get("yaml_cfg"))
    yaml_values = _load_yaml(yaml_path) if yaml_path else {}
    explicit = {**yaml_values, **cli_values, **python_values}
    preset = explicit.get("model_preset")
    preset_values = _preset_values(preset) if preset else {}

    values = {o.dest: o.default for o in _options()}
    source: dict[str, str] = {}
    for name, layer in (("preset", preset_values), ("yaml", yaml_values), ("cli", cli_values),
                        ("python", python_values)):
        for dest, value in layer.items():
            values[dest] = value
            source[dest] = name
    notes: list[str] = []
    _resolve_exclusive(values, source, notes)
    return _validate(values, source, notes)


_RANK = {"preset": 0, "yaml": 1, "cli": 2, "python": 2}


def _is_set(dest: str, values: Mapping[str, Any], source: Mapping[str, str]) -> bool:
    """Given by the user (not a preset) with a value other than the default."""
    by_dest = {o.dest: o for o in _options()}
    return source.get(dest, "preset") != "preset" and values[dest] != by_dest[dest].default


def _resolve_exclusive(values: dict[str, Any], source: dict[str, str], notes: list[str]) -> None:
    """Alternatives (``--train-iters`` / ``--train-samples``...): the higher source wins, same source is an error."""
    by_dest = {o.dest: o for o in _options()}
    for members in _EXCLUSIVE:
        present = [m for m in members if _is_set(m, values, source)]
        if len(present) < 2:
            continue
        top = max(_RANK[source[m]] for m in present)
        winners = [m for m in present if _RANK[source[m]] == top]
        if len(winners) > 1:
            names = " and ".join(by_dest[m].display for m in winners)
            raise ConfigError(f"{names} are mutually exclusive: give only one")
        for loser in present:
            if loser not in winners:
                notes.append(f"{by_dest[winners[0]].display} on the command line replaces "
                             f"{by_dest[loser].display} from the YAML file")
                values[loser] = by_dest[loser].default
                source.pop(loser)


def _validate(values: dict[str, Any], source: dict[str, str], notes: list[str]) -> RunConfig:
    by_dest = {o.dest: o for o in _options()}
    errors: list[str] = []
    for option in _options():  # argparse gives lists for nargs=N; tuple-typed fields want tuples
        if isinstance(option.nargs, int) and isinstance(values[option.dest], list):
            values[option.dest] = tuple(values[option.dest])

    def flag(dest: str) -> str:
        return by_dest[dest].display

    # -- iteration-based vs sample-based schedules (Megatron asserts the same)
    if values["train_iters"] is not None:
        mixed = [d for d in _SAMPLE_BASED if _is_set(d, values, source)]
        if mixed:
            errors.append(f"--train-iters (iteration-based) cannot be combined with "
                          f"{', '.join(flag(d) for d in mixed)}; use the *-iters forms")
    elif values["train_samples"] is not None:
        mixed = [d for d in _ITERATION_BASED if _is_set(d, values, source)]
        if mixed:
            errors.append(f"--train-samples (sample-based) cannot be combined with "
                          f"{', '.join(flag(d) for d in mixed)}; use the *-samples forms")
    else:
        errors.append("give the length of training: --train-iters or --train-samples")

    # -- required values
    for dest in ("hidden_size", "seq_length", "lr"):
        if values[dest] is None:
            errors.append(f"{flag(dest)} is required")
    if values["num_layers"] is None:
        pattern = values["hybrid_override_pattern"]
        if pattern:
            values["num_layers"] = len(pattern.replace("|", ""))
        else:
            errors.append("--num-layers is required (or --hybrid-override-pattern, or --model-preset)")

    # -- ranges
    positive = ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "train_samples", "log_interval",
                "eval_interval", "save_interval", "keep_last_n", "exit_interval", "tensor_model_parallel_size",
                "pipeline_model_parallel_size", "context_parallel_size", "make_vocab_size_divisible_by",
                "distributed_timeout_minutes", "vocab_size")
    for dest in positive:
        value = values[dest]
        if value is not None and value <= 0:
            errors.append(f"{flag(dest)} must be positive, got {value}")
    for dest in ("eval_iters", "lr_warmup_iters", "lr_warmup_samples", "max_consecutive_nan_skips", "num_workers",
                 "min_lr", "weight_decay", "clip_grad", "lr_warmup_init"):
        value = values[dest]
        if value is not None and value < 0:
            errors.append(f"{flag(dest)} must be >= 0, got {value}")
    if values["lr"] is not None and values["lr"] < values["min_lr"]:
        errors.append(f"--lr {values['lr']} is below --min-lr {values['min_lr']}")
    if values["lr_warmup_fraction"] is not None and not 0.0 <= values["lr_warmup_fraction"] < 1.0:
        errors.append(f"--lr-warmup-fraction must be in [0, 1), got {values['lr_warmup_fraction']}")

    # -- unsupported features, with the reason
    if values["fp16"]:
        errors.append("--fp16 is not supported (no loss scaling here); use --bf16")
    if values["fp16"] and values["bf16"]:
        errors.append("--fp16 and --bf16 are mutually exclusive")
    if values["normalization"] != "RMSNorm":
        errors.append(f"--normalization {values['normalization']} is not implemented: hybrid models here use "
                      "RMSNorm only (pass --normalization RMSNorm)")
    if values["position_embedding_type"] not in ("none", "rope"):
        errors.append(f"--position-embedding-type {values['position_embedding_type']} is not implemented; "
                      "use none (Mamba layers carry position) or rope")
    if values["context_parallel_size"] and values["context_parallel_size"] > 1:
        errors.append("--context-parallel-size > 1 is not implemented (context parallelism is not supported; "
                      "tensor, pipeline and data parallelism are); use 1")
    if values["enable_cuda_graph"]:
        for dest in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if values[dest] is not None and values[dest] > 1:
                errors.append(f"--enable-cuda-graph needs {flag(dest)} 1 (got {values[dest]}): the layer graphs "
                              "hold no collectives and one micro-batch in flight")
    if values["weight_decay_incr_style"] == "constant":
        for dest in ("start_weight_decay", "end_weight_decay"):
            if values[dest] is not None:
                errors.append(f"{flag(dest)} needs --weight-decay-incr-style linear or cosine")
    elif values["start_weight_decay"] is None or values["end_weight_decay"] is None:
        errors.append(f"--weight-decay-incr-style {values['weight_decay_incr_style']} needs --start-weight-decay "
                      "and --end-weight-decay")
    elif values["end_weight_decay"] < values["start_weight_decay"]:
        errors.append("--end-weight-decay must be >= --start-weight-decay")
    if values["lr_decay_style"] == "WSD" and values["lr_wsd_decay_iters"] is None \
            and values["lr_wsd_decay_samples"] is None:
        errors.append("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")

    # -- data and tokenizer
    has_blend = any(values[d] for d in ("train_data_path", "valid_data_path", "test_data_path"))
    if values["data_path"] and has_blend:
        errors.append("--data-path and --train-data-path/--valid-data-path/--test-data-path are mutually exclusive")
    if values["mock_data"] and has_blend:
        errors.append("--mock-data and --train-data-path/--valid-data-path/--test-data-path are mutually exclusive")
    if not (values["data_path"] or has_blend or values["mock_data"]):
        errors.append("give training data: --data-path (or --train-data-path ...), or --mock-data")
    tokenizer = values["tokenizer_type"]
    if tokenizer is None:
        errors.append("--tokenizer-type is required")
    elif tokenizer in ("HuggingFaceTokenizer", "GPTSentencePieceTokenizer") and not values["tokenizer_model"]:
        errors.append(f"--tokenizer-type {tokenizer} needs --tokenizer-model")
    elif tokenizer == "GPT2BPETokenizer" and not (values["vocab_file"] and values["merge_file"]):
        errors.append("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    elif tokenizer == "NullTokenizer" and values["vocab_size"] is None:
        errors.append("--tokenizer-type NullTokenizer needs --vocab-size")

    # -- model: Megatron semantics of the GQA switch, then HybridConfig's own checks
    if not values["group_query_attention"]:
        if _is_set("num_query_groups", values, source) and values["num_query_groups"] != \
                values["num_attention_heads"]:
            notes.append("--num-query-groups has no effect without --group-query-attention (Megatron semantics)")
        values["num_query_groups"] = None
    if values["tensor_model_parallel_size"] == 1 and values["sequence_parallel"]:
        notes.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1; disabled")
        values["sequence_parallel"] = False
    if values["save_interval"] is not None and not values["save"]:
        notes.append("--save-interval without --save: no checkpoints will be written")
    if values["spec"] is not None or values["use_mcore_models"]:
        notes.append("--use-mcore-models / --spec are accepted for Megatron compatibility and have no effect")
    if values["overlap_grad_reduce"] or values["overlap_param_gather"]:
        notes.append("--overlap-grad-reduce / --overlap-param-gather are accepted; communication is not overlapped")

    model = {o.dest: values[o.dest] for o in _options() if o.owner == "model"}
    if not errors and values["hidden_size"] is not None:
        try:
            config = HybridConfig(vocab_size=1, **model)
        except (TypeError, ValueError) as exc:
            errors.append(f"invalid model configuration: {exc}")
        else:
            pipeline_size = values["pipeline_model_parallel_size"]
            try:
                stage_layer_ranges(config, pipeline_size)
            except ValueError as exc:
                errors.append(f"--pipeline-model-parallel-size {pipeline_size} does not fit the model: {exc}")
    if errors:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(errors))

    def build(cls: type, owner: str) -> Any:
        return cls(**{o.dest: values[o.dest] for o in _options() if o.owner == owner})

    return RunConfig(
        model=model,
        model_flags=build(ModelFlags, "model_flags"),
        training=build(TrainingConfig, "training"),
        parallel=build(ParallelConfig, "parallel"),
        notes=notes,
        given=sorted(d for d, s in source.items() if s != "preset"),
    )


# ----------------------------------------------------------------------------------------------------------------
# The parsed result
# ----------------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class RunConfig:
    """A validated run: model fields (HybridConfig minus what training sets), model flags, training, parallel."""

    model: dict[str, Any]
    model_flags: ModelFlags
    training: TrainingConfig
    parallel: ParallelConfig
    notes: list[str] = field(default_factory=list)
    given: list[str] = field(default_factory=list)

    def model_config(self, vocab_size: int, tensor_parallel_size: int | None = None) -> HybridConfig:
        """The HybridConfig of this run for a tokenizer of ``vocab_size`` (padding as Megatron: divisor x TP)."""
        tp = tensor_parallel_size or self.parallel.tensor_model_parallel_size
        return HybridConfig(
            vocab_size=vocab_size,
            make_vocab_size_divisible_by=self.training.make_vocab_size_divisible_by * tp,
            sequence_parallel=self.parallel.sequence_parallel,
            **self.model,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (saved as ``args`` in every checkpoint)."""
        return {
            "model": _jsonable(self.model),
            "model_flags": _jsonable(dataclasses.asdict(self.model_flags)),
            "training": _jsonable(dataclasses.asdict(self.training)),
            "parallel": _jsonable(dataclasses.asdict(self.parallel)),
            "given": list(self.given),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict` (values are re-validated through :func:`make_run_config`)."""
        settings: dict[str, Any] = {}
        for section in ("model", "model_flags", "training", "parallel"):
            settings.update(data.get(section, {}))
        settings.pop("yaml_cfg", None)
        settings.pop("model_preset", None)  # its values are already in "model"
        if not settings.get("group_query_attention") and settings.get("num_query_groups") is not None:
            settings["group_query_attention"] = settings["num_query_groups"] != settings.get("num_attention_heads")
        return make_run_config(**settings)

    def summary(self) -> str:
        """Every setting, one per line (the start-of-run printout)."""
        lines = []
        for section, values in self.to_dict().items():
            if section == "given":
                continue
            lines.append(f"[{section}]")
            lines.extend(f"  {k} = {v}" for k, v in sorted(values.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class ResolvedRun:
    """Quantities that depend on the world size: batch split, iterations, LR-schedule lengths (in samples)."""

    world_size: int
    data_parallel_size: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    train_samples: int
    lr_warmup_steps: float
    lr_decay_steps: int
    lr_wsd_decay_steps: int | None
    wd_incr_steps: int
    start_weight_decay: float
    end_weight_decay: float


def resolve(run: RunConfig, world_size: int) -> ResolvedRun:
    """Derive the batch split and schedule lengths for ``world_size`` ranks (Megatron's rules); ConfigError if
    the sizes do not divide."""
    t, p = run.training, run.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline x context parallel = "
                          f"{model_parallel}")
    dp = world_size // model_parallel
    gbs = t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {t.micro_batch_size} x "
                          f"data-parallel size {dp} = {t.micro_batch_size * dp}")
    if t.train_iters is not None:
        train_iters = t.train_iters
        train_samples = train_iters * gbs
        decay = (t.lr_decay_iters if t.lr_decay_iters is not None else train_iters) * gbs
        warmup = t.lr_warmup_fraction * decay if t.lr_warmup_fraction is not None else t.lr_warmup_iters * gbs
        wsd = t.lr_wsd_decay_iters * gbs if t.lr_wsd_decay_iters is not None else None
    else:
        assert t.train_samples is not None
        train_samples = t.train_samples
        train_iters = train_samples // gbs
        if train_iters == 0:
            raise ConfigError(f"--train-samples {train_samples} is less than one global batch ({gbs})")
        decay = t.lr_decay_samples if t.lr_decay_samples is not None else train_samples
        warmup = t.lr_warmup_fraction * decay if t.lr_warmup_fraction is not None else t.lr_warmup_samples
        wsd = t.lr_wsd_decay_samples
    if decay <= 0:
        raise ConfigError("the learning-rate decay length must be positive")
    if warmup >= decay and t.lr_decay_style != "constant":
        raise ConfigError(f"warmup ({warmup} samples) must be shorter than the decay ({decay} samples)")
    if wsd is not None and not 0 < wsd <= decay:
        raise ConfigError(f"the WSD annealing ({wsd} samples) must be in (0, decay length {decay}]")
    if t.weight_decay_incr_style == "constant":
        start_wd = end_wd = t.weight_decay
    else:
        start_wd, end_wd = float(t.start_weight_decay), float(t.end_weight_decay)  # type: ignore[arg-type]
    return ResolvedRun(
        world_size=world_size,
        data_parallel_size=dp,
        global_batch_size=gbs,
        num_microbatches=gbs // (t.micro_batch_size * dp),
        train_iters=train_iters,
        train_samples=train_samples,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_wsd_decay_steps=wsd,
        wd_incr_steps=train_samples,
        start_weight_decay=start_wd,
        end_weight_decay=end_wd,
    )


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without it)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1"))
