"""The Megatron-style command line: every flag of the issue and of Megatron's examples/mamba/train.sh is accepted
with Megatron's meaning; unknown and contradictory settings fail naming the flags; YAML supplies the same settings."""

from __future__ import annotations

import json

import pytest

from megatron_hybrid.training.arguments import (
    ConfigError,
    RunConfig,
    build_parser,
    make_run_config,
    parse_args,
    resolve,
)

# Megatron-LM's examples/mamba/train.sh option list (800M), verbatim flags.
MEGATRON_EXAMPLE = """
--tensor-model-parallel-size 1 --sequence-parallel --pipeline-model-parallel-size 1 --use-distributed-optimizer
--overlap-param-gather --overlap-grad-reduce --untie-embeddings-and-output-weights --init-method-std 0.02
--position-embedding-type none --num-layers 48 --hidden-size 1024 --num-attention-heads 16 --group-query-attention
--num-query-groups 8 --hybrid-attention-ratio 0.08 --hybrid-mlp-ratio 0.5 --seq-length 4096
--max-position-embeddings 4096 --train-samples 73242188 --lr-warmup-samples 50000 --lr-decay-samples 73192188
--save ./checkpoints --load ./checkpoints --data-path ./data/text --data-cache-path ./data-cache --split 99,1,0
--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --distributed-backend nccl
--micro-batch-size 4 --global-batch-size 32 --lr 2.5e-4 --min-lr 2.5e-5 --lr-decay-style cosine --weight-decay 0.1
--clip-grad 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --disable-bias-linear --normalization RMSNorm
--adam-beta1 0.9 --adam-beta2 0.95 --log-interval 10 --save-interval 2000 --eval-interval 2000 --eval-iters 32
--bf16 --use-mcore-models --spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec
--no-create-attention-mask-in-dataloader --tensorboard-dir ./tensorboard
""".split()

# Every flag the issue lists.
ISSUE_FLAGS = """--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention
--num-query-groups --hybrid-attention-ratio --hybrid-mlp-ratio --hybrid-override-pattern --seq-length
--max-position-embeddings --micro-batch-size --global-batch-size --train-samples --train-iters --lr --min-lr
--lr-decay-style --lr-warmup-samples --lr-warmup-iters --lr-decay-samples --weight-decay --clip-grad --adam-beta1
--adam-beta2 --init-method-std --untie-embeddings-and-output-weights --position-embedding-type --normalization
--disable-bias-linear --attention-dropout --hidden-dropout --bf16 --save --load --save-interval --eval-interval
--eval-iters --log-interval --split --data-path --tokenizer-type --tokenizer-model --tensor-model-parallel-size
--pipeline-model-parallel-size --context-parallel-size --sequence-parallel --use-distributed-optimizer --seed
--tensorboard-dir --yaml-cfg --metrics-jsonl --keep-last-n""".split()

MINIMAL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "4", "--seq-length", "128",
           "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", "100"]


def _error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return str(info.value)


def test_every_issue_flag_exists() -> None:
    known = {s for action in build_parser()._actions for s in action.option_strings}
    missing = [f for f in ISSUE_FLAGS if f not in known]
    assert not missing, missing


def test_megatron_example_parses_with_megatron_meaning() -> None:
    run = parse_args(MEGATRON_EXAMPLE)
    m, t, p = run.model, run.training, run.parallel
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]) == (48, 1024, 16, 8)
    assert (m["hybrid_attention_ratio"], m["hybrid_mlp_ratio"]) == (0.08, 0.5)
    assert m["add_bias_linear"] is False and m["untie_embeddings_and_output_weights"] is True
    assert m["position_embedding_type"] == "none" and m["init_method_std"] == 0.02
    assert m["attention_dropout"] == 0.0 and m["hidden_dropout"] == 0.0
    assert m["activation"] == "gelu"  # Megatron's default activation: the example passes none
    assert (t.train_samples, t.lr_warmup_samples, t.lr_decay_samples) == (73242188, 50000, 73192188)
    assert (t.lr, t.min_lr, t.lr_decay_style, t.weight_decay, t.clip_grad) == (2.5e-4, 2.5e-5, "cosine", 0.1, 1.0)
    assert (t.adam_beta1, t.adam_beta2, t.bf16, t.split) == (0.9, 0.95, True, "99,1,0")
    assert (t.micro_batch_size, t.global_batch_size, t.seq_length) == (4, 32, 4096)
    assert (t.log_interval, t.save_interval, t.eval_interval, t.eval_iters) == (10, 2000, 2000, 32)
    assert t.tokenizer_type == "GPTSentencePieceTokenizer" and t.data_path == ["./data/text"]
    assert t.save == t.load == "./checkpoints" and t.tensorboard_dir == "./tensorboard"
    assert p.use_distributed_optimizer and p.distributed_backend == "nccl"
    assert p.sequence_parallel is False  # Megatron turns it off at TP 1
    assert any("sequence-parallel" in n for n in run.notes)
    config = run.model_config(256000)
    assert config.layer_pattern.count("*") == 4 and config.layer_pattern.count("-") == 24
    r = resolve(run, 8)
    assert (r.data_parallel_size, r.num_microbatches, r.train_iters) == (8, 1, 73242188 // 32)
    assert (r.lr_warmup_steps, r.lr_decay_steps) == (50000, 73192188)


def test_megatron_defaults_apply_when_flags_are_omitted() -> None:
    run = parse_args(MINIMAL)
    m, t = run.model, run.training
    assert m["activation"] == "gelu" and m["add_bias_linear"] is True
    assert m["attention_dropout"] == 0.1 and m["hidden_dropout"] == 0.1
    assert m["num_query_groups"] is None  # no --group-query-attention: one key/value head per head
    assert (t.lr_decay_style, t.weight_decay, t.adam_beta2, t.clip_grad, t.seed) == ("linear", 0.01, 0.999, 1.0, 1234)
    assert (t.log_interval, t.eval_interval, t.eval_iters, t.make_vocab_size_divisible_by) == (100, 1000, 100, 128)
    assert run.model_config(100).num_query_groups == 4


def test_switches_and_nargs() -> None:
    run = parse_args(MINIMAL + ["--swiglu", "--add-bias-linear", "--group-query-attention", "--num-query-groups", "2",
                                "--mamba-a-init-range", "1", "8", "--no-mamba-conv-bias", "--fp32-residual-connection"])
    assert run.model["activation"] == "swiglu" and run.model["add_bias_linear"] is True
    assert run.model["num_query_groups"] == 2 and run.model["mamba_A_init_range"] == (1.0, 8.0)
    assert run.model["mamba_conv_bias"] is False and run.model["residual_in_fp32"] is True
    blend = parse_args([a for a in MINIMAL if a != "--mock-data"] + ["--data-path", "0.3", "a", "0.7", "b"])
    assert blend.training.data_path == ["0.3", "a", "0.7", "b"]


def test_unknown_flags_are_named_with_suggestions() -> None:
    message = _error(MINIMAL + ["--hiden-size", "3", "--frobnicate"])
    assert "--hiden-size" in message and "--hidden-size" in message and "--frobnicate" in message
    assert "invalid choice" in _error(MINIMAL + ["--lr-decay-style", "exp"])
    assert "--train-iters" in _error(MINIMAL + ["--train-iters", "x"])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--train-samples", "100"], "--train-iters and --train-samples are mutually exclusive"),
        (["--lr-warmup-iters", "2", "--lr-warmup-samples", "5"], "--lr-warmup-iters and --lr-warmup-samples"),
        (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-iters and --lr-warmup-fraction"),
        (["--lr-decay-samples", "5"], "--train-iters (iteration-based) cannot be combined with --lr-decay-samples"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm is not implemented"),
        (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute"),
        (["--pipeline-model-parallel-size", "8"], "--pipeline-model-parallel-size 8 does not fit the model: "
                                                  "pipeline-parallel size 8 exceeds the model's 4 layers"),
        (["--pipeline-model-parallel-size", "3"], "cannot split 4 layers evenly over pipeline_size=3"),
        (["--pipeline-model-parallel-size", "3", "--hybrid-override-pattern", "M|MMM"],
         "has 1 '|' separators, i.e. 2 pipeline stages, but pipeline_size=3"),
        (["--context-parallel-size", "2"], "--context-parallel-size > 1 is not implemented"),
        (["--fp16"], "--fp16 is not supported"),
        (["--enable-cuda-graph", "--tensor-model-parallel-size", "2"],
         "--enable-cuda-graph needs --tensor-model-parallel-size 1 (got 2)"),
        (["--enable-cuda-graph", "--pipeline-model-parallel-size", "2"],
         "--enable-cuda-graph needs --pipeline-model-parallel-size 1 (got 2)"),
        (["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
        (["--data-path", "x"], "--data-path and --mock-data are mutually exclusive"),
        (["--start-weight-decay", "0.1"], "--start-weight-decay needs --weight-decay-incr-style"),
        (["--hidden-size", "66"], "invalid model configuration"),
        (["--micro-batch-size", "0"], "--micro-batch-size must be positive"),
        (["--min-lr", "1"], "is below --min-lr"),
    ],
)
def test_contradictions_fail_naming_the_flags(extra: list[str], expected: str) -> None:
    assert expected in _error(MINIMAL + extra)


def test_required_and_tokenizer_errors() -> None:
    message = _error(["--num-layers", "2"])
    for needed in ("--hidden-size is required", "--seq-length is required", "--lr is required",
                   "--train-iters or --train-samples", "--tokenizer-type is required", "--data-path"):
        assert needed in message
    assert "needs --tokenizer-model" in _error(MINIMAL[:-4] + ["--tokenizer-type", "HuggingFaceTokenizer"])
    assert "needs --vocab-file and --merge-file" in _error(MINIMAL[:-4] + ["--tokenizer-type", "GPT2BPETokenizer"])
    run = parse_args(MINIMAL[2:] + ["--hybrid-override-pattern", "M*-M"])  # num_layers from the pattern
    assert run.model["num_layers"] == 4


def test_global_batch_must_divide_by_micro_times_dp() -> None:
    run = parse_args(MINIMAL + ["--micro-batch-size", "2", "--global-batch-size", "12"])
    assert resolve(run, 2).num_microbatches == 3
    with pytest.raises(ConfigError, match="--global-batch-size 12 is not divisible by --micro-batch-size 2 x "
                                          "data-parallel size 4"):
        resolve(run, 4)
    with pytest.raises(ConfigError, match="not divisible by tensor"):
        resolve(parse_args(MINIMAL + ["--tensor-model-parallel-size", "2"]), 3)
    assert resolve(parse_args(MINIMAL + ["--micro-batch-size", "3"]), 2).global_batch_size == 6  # default m x dp


def test_sample_based_schedule_lengths() -> None:
    argv = [a for a in MINIMAL if a not in ("--train-iters", "10")] + [
        "--train-samples", "1000", "--global-batch-size", "8", "--lr-warmup-fraction", "0.1",
        "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "200"]
    r = resolve(parse_args(argv), 1)
    assert (r.train_iters, r.lr_decay_steps, r.lr_warmup_steps, r.lr_wsd_decay_steps) == (125, 1000, 100.0, 200)
    r = resolve(parse_args(MINIMAL + ["--lr-warmup-iters", "2", "--lr-decay-iters", "8", "--global-batch-size", "4"]),
                1)
    assert (r.lr_warmup_steps, r.lr_decay_steps, r.train_samples) == (8, 32, 40)


def test_yaml_supplies_settings_and_cli_overrides(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model:\n  num_layers: 6\n  hidden-size: 512\n  num_attention_heads: 4\n  swiglu: true\n"
        "training:\n  lr: 1e-4\n  train_iters: 50\n  seq_length: 256\n  data_path: 0.5 a 0.5 b\n"
        "  tokenizer_type: NullTokenizer\n  vocab_size: 99\n  disable_bias_linear: true\n"
        "parallel:\n  use_distributed_optimizer: true\n"
    )
    run = parse_args(["--yaml-cfg", str(cfg)])
    assert run.model["num_layers"] == 6 and run.model["activation"] == "swiglu"
    assert run.training.lr == 1e-4 and isinstance(run.training.lr, float)  # YAML 1.1 reads "1e-4" as a string
    assert run.training.data_path == ["0.5", "a", "0.5", "b"] and run.model["add_bias_linear"] is False
    assert run.parallel.use_distributed_optimizer
    run = parse_args(["--yaml-cfg", str(cfg), "--num-layers", "8", "--train-samples", "640"])
    assert run.model["num_layers"] == 8
    assert run.training.train_samples == 640 and run.training.train_iters is None  # CLI alternative wins
    assert any("replaces --train-iters from the YAML file" in n for n in run.notes)
    same = make_run_config(yaml_cfg=str(cfg), lr=5e-4)
    assert same.training.lr == 5e-4 and same.model["num_layers"] == 6

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): hiden_size \(did you mean hidden_size"):
        parse_args(["--yaml-cfg", str(bad)])
    bad.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="invalid value for --lr"):
        parse_args(["--yaml-cfg", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_args(["--yaml-cfg", str(bad)])
    both = tmp_path / "both.yaml"
    both.write_text("train_iters: 5\ntrain_samples: 50\n")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse_args(MINIMAL[:8] + MINIMAL[10:] + ["--yaml-cfg", str(both)])


def test_model_preset_and_json_round_trip() -> None:
    run = make_run_config(model_preset="tiny", seq_length=64, train_iters=3, lr=1e-3, mock_data=True,
                          tokenizer_type="NullTokenizer", vocab_size=50, hidden_dropout=0.0)
    assert run.model["hidden_size"] == 256 and run.model["num_query_groups"] == 4
    assert run.model["activation"] == "squared_relu" and run.model["attention_dropout"] == 0.0
    data = json.loads(run.to_json())
    again = RunConfig.from_dict(data)
    assert again.to_dict()["model"] == data["model"] and again.training == run.training
    assert again.model_config(50) == run.model_config(50)
