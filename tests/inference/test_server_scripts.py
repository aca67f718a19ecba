"""The launchers: examples/mamba/run_text_gen_server_8b(.sh / _gpt3.sh) and tools/run_text_generation_server.py.

The 8B flags are checked by building the configuration they describe (DRY_RUN prints the command); the scripts
themselves serve tiny models on CPU (MODEL_SCALE=tiny) from a training checkpoint and from a transformers directory,
answering real HTTP requests.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from server_testlib import (
    PYTHON,
    REPO_ROOT,
    call,
    free_port,
    stop_process,
    subprocess_env,
    tiny_model,
    train_tiny_tokenizer,
    wait_healthy,
)

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.inference.server_cli import _check_against, build_parser, config_overrides_from_args

SCRIPTS = REPO_ROOT / "examples" / "mamba"


def dry_run(script: str, *extra: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPTS / script), "/nonexistent-is-fine-for-dry-run", "tok.model", *extra],
                         env={**subprocess_env(), "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)
    if "does not exist" in out.stderr:  # the scripts check the checkpoint path first
        return []
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def server_args(script: str, tmp_path: Path, *extra: str, **env: str) -> list[str]:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    out = subprocess.run(["bash", str(SCRIPTS / script), str(ckpt), "tok.model", *extra],
                         env={**subprocess_env(), "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].endswith("tools/run_text_generation_server.py")
    return lines[2:]


def test_8b_script_flags_describe_megatrons_8b_hybrid(tmp_path):
    argv = server_args("run_text_gen_server_8b.sh", tmp_path, "--port", "5123")
    args = build_parser().parse_args(argv)
    assert args.port == 5123 and args.bf16 and args.load and args.tokenizer_type == "GPTSentencePieceTokenizer"
    overrides = config_overrides_from_args(args)
    config = HybridConfig(vocab_size=256000, **overrides)
    pattern = config.layer_pattern
    assert len(pattern) == 56 and config.hidden_size == 4096
    assert (config.num_attention_heads, config.num_query_groups) == (32, 8)
    assert config.position_embedding_type == "none" and config.untie_embeddings_and_output_weights
    assert not config.add_bias_linear and args.seq_length == 4096
    from megatron_hybrid.models.presets import get_preset

    preset = get_preset("8B")
    for name, value in overrides.items():
        assert getattr(preset, name) == value, name
    assert pattern == preset.layer_pattern


def test_gpt3_script_flags_describe_a_transformer(tmp_path):
    argv = server_args("run_text_gen_server_8b_gpt3.sh", tmp_path)
    overrides = config_overrides_from_args(build_parser().parse_args(argv))
    config = HybridConfig(vocab_size=256000, **overrides)
    assert config.layer_pattern == "*-" * 32
    assert config.num_layers == 64 and config.hidden_size == 4096
    assert config.position_embedding_type == "rope" and config.rotary_percent == 0.5
    assert config.activation == "squared_relu"
    assert config.num_query_groups == config.num_attention_heads == 32  # multi-head, as Megatron without GQA


def test_tiny_scale_and_tensor_parallel_launch(tmp_path):
    argv = server_args("run_text_gen_server_8b.sh", tmp_path, MODEL_SCALE="tiny")
    assert "--use-checkpoint-args" in argv and "--bf16" not in argv and "--hidden-size" not in argv
    ckpt = tmp_path / "ckpt"
    out = subprocess.run(["bash", str(SCRIPTS / "run_text_gen_server_8b.sh"), str(ckpt), "tok.model"],
                         env={**subprocess_env(), "DRY_RUN": "1", "TP": "2"}, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert lines[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and lines[4] == "2"
    assert "--tensor-model-parallel-size" in lines and lines[lines.index("--tensor-model-parallel-size") + 1] == "2"


def test_flags_are_checked_against_the_loaded_config():
    config = HybridConfig(num_layers=4, hidden_size=64, vocab_size=100, hybrid_override_pattern="M*-M",
                          num_attention_heads=4, mamba_head_dim=16, mamba_num_groups=1)
    _check_against(config, {"num_layers": 4, "hybrid_override_pattern": "M*-M", "hidden_size": 64,
                            "hidden_dropout": 0.5}, "checkpoint")  # dropout does not matter for serving
    with pytest.raises(SystemExit, match="layer pattern: .* gives 'MM-\\*' vs checkpoint 'M\\*-M'"):
        _check_against(config, {"hybrid_override_pattern": "MM-*"}, "checkpoint")
    with pytest.raises(SystemExit, match="num_attention_heads: command line 8 vs checkpoint 4"):
        _check_against(config, {"num_attention_heads": 8, "hidden_size": 64}, "checkpoint")


def test_script_usage_errors(tmp_path):
    out = subprocess.run(["bash", str(SCRIPTS / "run_text_gen_server_8b.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "Use:" in out.stderr
    out = subprocess.run(["bash", str(SCRIPTS / "run_text_gen_server_8b.sh"), str(tmp_path / "missing"), ""],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run(["bash", str(SCRIPTS / "run_text_gen_server_8b.sh"), str(tmp_path), ""],
                         env={**subprocess_env(), "MODEL_SCALE": "huge"}, capture_output=True, text=True)
    assert out.returncode == 2 and "MODEL_SCALE" in out.stderr


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny training checkpoint (with its tokenizer inside) and the same weights as a transformers directory."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = train_tiny_tokenizer(root)
    # No RoPE (NemotronH has none); two Mamba groups so that the model also splits over 2 tensor-parallel ranks.
    model = tiny_model(tokenizer.vocab_size, seed=3, position_embedding_type="none", mamba_num_groups=2)
    checkpoint = pytest.importorskip("megatron_hybrid.checkpoint",
                                     reason="megatron_hybrid.checkpoint (training checkpoints) is not there yet")
    checkpoint.save_checkpoint(root / "ckpt", 1, model, tokenizer_args={
        "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(root / "tok")}, save_rng=False)
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    shutil.copy(root / "tok" / "tokenizer.json", hf_dir / "tokenizer.json")
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (root / "tok" / extra).exists():
            shutil.copy(root / "tok" / extra, hf_dir / extra)
    return root, tokenizer, model


def _expected_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    from megatron_hybrid.inference.engine import InferenceEngine
    from megatron_hybrid.inference.sampling import SamplingParams

    ids = tokenizer.tokenize(prompt)
    engine = InferenceEngine(model, tokenizer, max_batch_size=1, max_sequence_length=256)
    out = engine.generate([ids], SamplingParams(max_new_tokens=n, top_k=1, stop_token_ids=(tokenizer.eod,)))[0]
    return ids + out.token_ids


def _serve_and_check(cmd: list[str], port: int, model, tokenizer, exit_codes=(0, -15)) -> str:
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = wait_healthy(port, proc)
        assert health["status"] == "ok"
        status, body = call(("127.0.0.1", port), "PUT", "/api", {"prompts": ["def main():"], "tokens_to_generate": 8,
                                                                 "top_k": 1})
        assert status == 200, body
        assert body["tokens"][0] == _expected_greedy(model, tokenizer, "def main():", 8)
        status, body = call(("127.0.0.1", port), "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert status == 200, body
    finally:
        output = stop_process(proc)
    assert proc.returncode in exit_codes, output  # SIGTERM: uvicorn shuts down gracefully
    return output


def test_8b_script_serves_a_tiny_training_checkpoint(tiny_assets):
    root, tokenizer, model = tiny_assets
    port = free_port()
    cmd = ["bash", str(SCRIPTS / "run_text_gen_server_8b.sh"), str(root / "ckpt"), "", "--port", str(port),
           "--inference-max-seq-length", "256", "--device", "cpu"]
    env_cmd = ["env", "MODEL_SCALE=tiny", *cmd]
    _serve_and_check(env_cmd, port, model, tokenizer)


@pytest.mark.slow
def test_gpt3_script_serves_a_tiny_transformers_directory(tiny_assets):
    root, tokenizer, model = tiny_assets
    port = free_port()
    cmd = ["env", "MODEL_SCALE=tiny", "bash", str(SCRIPTS / "run_text_gen_server_8b_gpt3.sh"), str(root / "hf"), "",
           "--port", str(port), "--inference-max-seq-length", "256", "--device", "cpu"]
    _serve_and_check(cmd, port, model, tokenizer)


@pytest.mark.slow
def test_random_init_with_null_tokenizer():
    port = free_port()
    cmd = [PYTHON, str(REPO_ROOT / "tools" / "run_text_generation_server.py"), "--random-init", "--num-layers", "3",
           "--hybrid-override-pattern", "M*-", "--hidden-size", "64", "--num-attention-heads", "4",
           "--mamba-head-dim", "16", "--mamba-num-groups", "1", "--mamba-state-dim", "16",
           "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--port", str(port), "--device", "cpu",
           "--inference-max-seq-length", "128"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_healthy(port, proc)["context_length"] == 128
        status, body = call(("127.0.0.1", port), "PUT", "/api", {"prompts": ["1 2 3"], "tokens_to_generate": 4,
                                                                 "top_k": 1})
        assert status == 200 and body["tokens"][0][:3] == [1, 2, 3], body
        status, body = call(("127.0.0.1", port), "PUT", "/api", {"prompts": ["not ids"]})
        assert status == 400 and "cannot tokenize the prompt" in body["message"], body
    finally:
        stop_process(proc)


def test_model_flags_must_match_the_checkpoint(tiny_assets):
    root, _, _ = tiny_assets
    cmd = [PYTHON, str(REPO_ROOT / "tools" / "run_text_generation_server.py"), "--load", str(root / "ckpt"),
           "--hidden-size", "4096", "--num-layers", "4", "--port", str(free_port())]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "hidden_size: command line 4096 vs checkpoint 64" in out.stderr
    assert "num_layers" not in out.stderr  # that one agrees


def test_exactly_one_model_source():
    out = subprocess.run([PYTHON, str(REPO_ROOT / "tools" / "run_text_generation_server.py")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "exactly one of --load" in out.stderr


@pytest.mark.slow
def test_tensor_parallel_serving_through_torchrun(tiny_assets):
    """TP=2 on CPU (gloo): rank 0 serves, rank 1 follows its engine; the answers match a single-process engine."""
    root, tokenizer, model = tiny_assets
    port = free_port()
    cmd = ["env", "MODEL_SCALE=tiny", "TP=2", f"MASTER_PORT={free_port()}", "bash",
           str(SCRIPTS / "run_text_gen_server_8b.sh"), str(root / "ckpt"), "", "--port", str(port),
           "--inference-max-seq-length", "256", "--device", "cpu"]
    output = _serve_and_check(cmd, port, model, tokenizer, exit_codes=(0, 1, -15))  # torchrun: 1 after SIGTERM
    assert "Application shutdown complete" in output, output
    assert "[rank1]: Traceback" not in output, output  # the worker was released by rank 0, not killed mid-broadcast
