"""Shared pieces of the server tests: one real uvicorn server on 127.0.0.1 per test process, HTTP helpers.

The server (tiny random hybrid model, byte-level BPE tokenizer trained here on stdlib text, real InferenceEngine) is
started once, on first use, and stopped at exit, so every test_server*.py module shares it. A second copy of the
model drives a separate engine (``reference``) that generates each prompt alone, the oracle for greedy answers.
The module name is unique across test folders (pytest puts each folder on sys.path).
"""

from __future__ import annotations

import atexit
import copy
import glob
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CONTEXT = 1024
MAX_BATCH = 16

_lock = threading.Lock()
_shared: SharedServer | None = None


def stdlib_corpus(n_files: int = 40) -> str:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:n_files]
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read(3000))
    return "\n".join(texts) + "\nDéjà vu — naïve café, 東京, emoji 🙂\n"


def train_tiny_tokenizer(directory: Path) -> Any:
    from megatron_hybrid.tokenizers import build_tokenizer
    from megatron_hybrid.tokenizers.training import train_bpe_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(stdlib_corpus(), encoding="utf-8")
    train_bpe_tokenizer([str(corpus)], str(directory / "tok"), vocab_size=400)
    return build_tokenizer("HuggingFaceTokenizer", str(directory / "tok"))


def tiny_model(vocab_size: int, seed: int = 0, position_embedding_type: str = "rope", mamba_num_groups: int = 1
               ) -> Any:
    """4 layers (Mamba, attention, MLP, Mamba), hidden 64; a large init std so logits are peaked (greedy answers do
    not hinge on rounding)."""
    from megatron_hybrid.config import HybridConfig
    from megatron_hybrid.models.mamba_model import MambaModel

    torch.manual_seed(seed)
    config = HybridConfig(
        num_layers=4, hidden_size=64, vocab_size=vocab_size, hybrid_override_pattern="M*-M", num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=128, mamba_state_dim=16, mamba_head_dim=16,
        mamba_num_groups=mamba_num_groups, mamba_chunk_size=16, max_position_embeddings=CONTEXT,
        position_embedding_type=position_embedding_type, init_method_std=0.2,
    )
    return MambaModel(config).eval()


@dataclass
class SharedServer:
    host: str
    port: int
    tokenizer: Any
    model: Any
    service: Any
    workdir: Path
    _background: Any
    _reference: Any
    _reference_lock: threading.Lock

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def reference(self, prompt_ids: list[int], **params: Any) -> Any:
        """GenerationOutput of ``prompt_ids`` generated ALONE on a separate engine over a copy of the model."""
        from megatron_hybrid.inference.sampling import SamplingParams

        with self._reference_lock:
            return self._reference.generate([prompt_ids], SamplingParams(**params))[0]

    def stats(self) -> dict[str, Any]:
        status, body = call(self, "GET", "/health")
        assert status == 200, body
        return body

    def stop(self) -> None:
        self._background.stop()


def shared_server() -> SharedServer:
    global _shared
    with _lock:
        if _shared is None:
            _shared = _start()
            atexit.register(_shared.stop)
        return _shared


def _start() -> SharedServer:
    from megatron_hybrid.inference.engine import InferenceEngine
    from megatron_hybrid.inference.server import (
        BackgroundServer,
        ServerConfig,
        TextGenerationService,
        create_app,
    )

    workdir = Path(tempfile.mkdtemp(prefix="mh-server-test-"))
    tokenizer = train_tiny_tokenizer(workdir)
    model = tiny_model(tokenizer.vocab_size)
    reference_model = copy.deepcopy(model)
    engine = InferenceEngine(model, tokenizer, max_batch_size=MAX_BATCH, max_sequence_length=CONTEXT)
    service = TextGenerationService(engine, tokenizer, ServerConfig(context_length=CONTEXT, model_name="tiny-test"))
    background = BackgroundServer(create_app(service)).start()
    reference = InferenceEngine(reference_model, tokenizer, max_batch_size=1, max_sequence_length=CONTEXT)
    return SharedServer(background.host, background.port, tokenizer, model, service, workdir, background, reference,
                        threading.Lock())


# ------------------------------------------------------------------------------------------------------------ HTTP


def call(target: Any, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON body or the raw text when it is not JSON)."""
    host, port = _address(target)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        status = response.status
        content_type = response.getheader("Content-Type", "")
    finally:
        conn.close()
    if "application/json" in content_type:
        return status, json.loads(payload)
    return status, payload.decode("utf-8", errors="replace")


def sse_events(target: Any, path: str, body: Any, timeout: float = 60.0) -> tuple[int, list[Any]]:
    """POST a streaming request; returns (status, events) where events are parsed JSON objects or the string
    ``"[DONE]"``, in order. Checks the framing: every event is one ``data: ...`` line followed by a blank line."""
    host, port = _address(target)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read().decode("utf-8")
        status = response.status
        content_type = response.getheader("Content-Type", "")
    finally:
        conn.close()
    if status != 200:
        return status, [json.loads(payload)]
    assert content_type.startswith("text/event-stream"), content_type
    assert payload.endswith("\n\n"), payload[-50:]
    events: list[Any] = []
    for block in payload.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return status, events


def _address(target: Any) -> tuple[str, int]:
    if isinstance(target, tuple):
        return target
    return target.host, target.port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict[str, Any]:
    """Poll GET /health until 200 (fails early if the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}:\n{out}")
        try:
            status, body = call(("127.0.0.1", port), "GET", "/health", timeout=5)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy in time")


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """SIGTERM (graceful uvicorn shutdown), then SIGKILL if needed; returns the captured output."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.stdout.read() if proc.stdout else ""


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHON"] = PYTHON
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
