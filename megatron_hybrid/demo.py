"""``make demo``: train the tiny hybrid Mamba-2/attention model on real text on a CPU, then generate from it.

Everything runs offline and end to end through the framework's own pieces:

1. **Corpus**: the Python standard library's own source (every ``.py`` under ``os.path.dirname(os.__file__)``, minus
   site-packages, test suites and generated tables; about 10 MB), one JSON line per file in sorted path order. It is
   real text that ships with every Python and that no one in this project wrote.
2. **Tokenizer**: a byte-level BPE (4096 entries) trained on that corpus with
   :func:`megatron_hybrid.tokenizers.training.train_bpe_tokenizer` (what ``tools/train_tokenizer.py`` runs).
3. **Indexed dataset**: :func:`megatron_hybrid.data.preprocess.preprocess_jsonl` (``tools/preprocess_data.py``) writes
   the Megatron ``.bin`` / ``.idx`` pair, two worker processes.
4. **Training**: :func:`megatron_hybrid.training.pretrain` on the ``tiny`` preset (8 layers ``MM*-M*M-``, hidden 256)
   with a live progress line; it saves a checkpoint and ``metrics.jsonl``. A loss-curve PNG is written beside them.
5. **Generation**: the checkpoint is loaded back (:func:`megatron_hybrid.checkpoint.load_model_for_inference`) and
   :class:`megatron_hybrid.inference.InferenceEngine` continues a code prompt.

Steps 1-3 are cached under ``--work-dir`` (default ``demo_output/``) and reused by later runs; every run trains
afresh into ``<work-dir>/run``. The default settings were tuned to finish training in well under 5 minutes on 2 CPU
cores; ``--quick`` is a seconds-long smoke run on a small corpus subset (used by the tests).

    python -m megatron_hybrid.demo [--work-dir DIR] [--iters N] [--seed S] [--quick] [--threads T] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "DemoSettings",
    "FULL",
    "QUICK",
    "ProgressDisplay",
    "build_corpus",
    "main",
    "plot_loss_curve",
    "stdlib_source_files",
]

DEFAULT_WORK_DIR = "demo_output"
RUN_MARKER = ".megatron_hybrid_demo_run"
# Directories of the standard library that are not its own hand-written source, or are mostly test fixtures:
# third-party packages, test suites, codec tables generated from Unicode mappings, the generated pydoc topics.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data",
})


@dataclass(frozen=True)
class DemoSettings:
    """Corpus, tokenizer and training sizes of one kind of demo run.

    Why these values (full run, measured on 2 cores): the ``tiny`` preset at 8 x 256 tokens takes about 0.4 s per
    step, so 400 steps train in about 3 minutes on a quiet machine and stay under 5 with the machine half busy; a
    4096-entry vocabulary keeps the output layer (the biggest single matmul) cheap while still giving about 3.5
    bytes per token of Python; lr 3e-3 with a short warmup and cosine decay learned best of 2e-3 / 3e-3 / 4e-3 and
    of 16 x 128-token batches (validation loss 4.25 after 400 steps).
    """

    name: str
    vocab_size: int
    max_corpus_bytes: int | None  # None: the whole filtered standard library
    seq_length: int
    micro_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    warmup_iters: int
    eval_iters: int
    max_new_tokens: int
    split: str  # train,valid,test shares of the documents (files); a small corpus needs a larger valid share


FULL = DemoSettings(name="full", vocab_size=4096, max_corpus_bytes=None, seq_length=256, micro_batch_size=8,
                    train_iters=400, lr=3e-3, min_lr=2e-4, warmup_iters=20, eval_iters=4, max_new_tokens=120,
                    split="98,2,0")
QUICK = DemoSettings(name="quick", vocab_size=512, max_corpus_bytes=400_000, seq_length=64, micro_batch_size=4,
                     train_iters=12, lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_iters=1, max_new_tokens=24,
                     split="80,20,0")


# ----------------------------------------------------------------------------------------------------------------
# Corpus, tokenizer and indexed dataset (cached)
# ----------------------------------------------------------------------------------------------------------------


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library (where ``os.py`` lives; also right inside a venv)."""
    return os.path.dirname(os.path.abspath(os.__file__))


def stdlib_source_files(root: str | None = None, max_bytes: int | None = None) -> list[str]:
    """Sorted ``.py`` files of the standard library (paths relative to ``root``), without :data:`EXCLUDED_DIRS`.

    The order is the sorted relative path (directories walked in sorted order), so the corpus is byte-for-byte the
    same on every run of the same Python. ``max_bytes`` keeps the leading files up to that total (quick runs).
    """
    root = root or stdlib_root()
    chosen: list[str] = []
    total = 0
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            if max_bytes is not None and total + size > max_bytes:
                if total > 0:
                    return chosen
                continue
            chosen.append(os.path.relpath(path, root))
            total += size
    return chosen


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_stamp(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_corpus(jsonl_path: str, max_bytes: int | None = None, root: str | None = None) -> dict[str, Any]:
    """Write the standard-library corpus as JSONL (``{"text": source, "path": relative path}`` per file).

    Files that are not valid UTF-8 or hold only whitespace are left out (named in the returned ``skipped`` list):
    preprocessing refuses empty documents, and the tokenizer trains on text. Returns the corpus manifest.
    """
    root = root or stdlib_root()
    files = stdlib_source_files(root, max_bytes)
    documents, text_bytes, skipped = 0, 0, []
    tmp = f"{jsonl_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for rel in files:
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                skipped.append(rel)
                continue
            if not text.strip():
                skipped.append(rel)
                continue
            out.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
            documents += 1
            text_bytes += len(text.encode("utf-8"))
    os.replace(tmp, jsonl_path)
    return {"root": root, "python": sys.version.split()[0], "documents": documents, "text_bytes": text_bytes,
            "skipped": skipped, "max_bytes": max_bytes, "sha256": _sha256_file(jsonl_path)}


@dataclass
class PreparedData:
    """Paths of the cached artefacts of one settings kind, and what the preparation did."""

    corpus: str
    tokenizer_dir: str
    data_prefix: str
    corpus_manifest: dict[str, Any]
    num_tokens: int
    timings: dict[str, float]
    reused: list[str]


def prepare_data(data_dir: str, settings: DemoSettings, log: Callable[[str], None]) -> PreparedData:
    """Corpus -> tokenizer -> indexed dataset under ``data_dir``, each stage reused when its stamp still matches.

    A stage's stamp (``*.done.json``, written last and atomically) records the fingerprint of its input, so an
    interrupted stage or a changed input is rebuilt, and nothing stale is ever reused.
    """
    os.makedirs(data_dir, exist_ok=True)
    timings: dict[str, float] = {}
    reused: list[str] = []

    corpus = os.path.join(data_dir, "stdlib.jsonl")
    corpus_stamp = os.path.join(data_dir, "corpus.done.json")
    manifest = _read_stamp(corpus_stamp)
    want = {"root": stdlib_root(), "python": sys.version.split()[0], "max_bytes": settings.max_corpus_bytes}
    t0 = time.perf_counter()
    if (manifest and all(manifest.get(k) == v for k, v in want.items()) and os.path.isfile(corpus)
            and os.path.getsize(corpus) > 0):
        reused.append("corpus")
        log(f"corpus     reused {corpus} ({manifest['documents']} files, {manifest['text_bytes'] / 1e6:.1f} MB)")
    else:
        manifest = build_corpus(corpus, settings.max_corpus_bytes)
        _atomic_write_text(corpus_stamp, json.dumps(manifest, indent=2))
        log(f"corpus     {manifest['documents']} .py files of the Python {manifest['python']} standard library "
            f"({manifest['text_bytes'] / 1e6:.1f} MB) from {manifest['root']} -> {corpus}")
    timings["corpus_s"] = time.perf_counter() - t0

    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    tok_stamp = os.path.join(data_dir, "tokenizer.done.json")
    tok_key = {"corpus_sha256": manifest["sha256"], "vocab_size": settings.vocab_size, "kind": "byte-level BPE"}
    t0 = time.perf_counter()
    if _read_stamp(tok_stamp) == tok_key and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        reused.append("tokenizer")
        log(f"tokenizer  reused {tokenizer_dir}")
    else:
        from megatron_hybrid.tokenizers.training import train_bpe_tokenizer

        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        train_bpe_tokenizer([corpus], tokenizer_dir, settings.vocab_size, json_keys=("text",),
                            write_gpt2_files=False)
        _atomic_write_text(tok_stamp, json.dumps(tok_key))
        log(f"tokenizer  byte-level BPE, {settings.vocab_size} entries, trained in "
            f"{time.perf_counter() - t0:.1f}s -> {tokenizer_dir}")
    timings["tokenizer_s"] = time.perf_counter() - t0

    output_prefix = os.path.join(data_dir, "stdlib")
    data_prefix = f"{output_prefix}_text_document"
    data_stamp = os.path.join(data_dir, "dataset.done.json")
    data_key = {"corpus_sha256": manifest["sha256"],
                "tokenizer_sha256": _sha256_file(os.path.join(tokenizer_dir, "tokenizer.json"))}
    stamp = _read_stamp(data_stamp)
    t0 = time.perf_counter()
    if (stamp and all(stamp.get(k) == v for k, v in data_key.items()) and os.path.isfile(data_prefix + ".bin")
            and os.path.isfile(data_prefix + ".idx")):
        reused.append("dataset")
        num_tokens = int(stamp["tokens"])
        log(f"dataset    reused {data_prefix}.bin/.idx ({num_tokens:,} tokens)")
    else:
        from megatron_hybrid.data.preprocess import preprocess_jsonl

        # The tokenizer trainer used Rust threads in this process; say explicitly that forked workers must not
        # (the tokenizers library would otherwise warn about it once per worker).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        shutil.rmtree(os.path.join(data_dir, "cache"), ignore_errors=True)  # sample indices of an older dataset
        stats = preprocess_jsonl(corpus, output_prefix,
                                 {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_dir},
                                 json_keys=("text",), append_eod=True, workers=2, log_interval=0)
        num_tokens = stats.tokens["text"]
        _atomic_write_text(data_stamp, json.dumps({**data_key, "tokens": num_tokens, "documents": stats.documents}))
        log(f"dataset    {stats.documents} documents, {num_tokens:,} tokens "
            f"({manifest['text_bytes'] / max(num_tokens, 1):.2f} bytes/token), 2 workers, "
            f"{stats.seconds:.1f}s -> {data_prefix}.bin/.idx")
    timings["dataset_s"] = time.perf_counter() - t0
    return PreparedData(corpus=corpus, tokenizer_dir=tokenizer_dir, data_prefix=data_prefix,
                        corpus_manifest=manifest, num_tokens=num_tokens, timings=timings, reused=reused)


# ----------------------------------------------------------------------------------------------------------------
# Progress display
# ----------------------------------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressDisplay:
    """Live training progress from ``pretrain(on_iteration=...)``.

    On a terminal one line is rewritten in place (carriage return + clear-to-end-of-line); elsewhere (logs, CI,
    pipes) a plain line is printed every ``plain_every`` iterations and at the last one, so logs stay readable.
    ``loss`` shown is the mean of the last ``window`` iterations (single-batch losses are noisy).
    """

    def __init__(self, stream: TextIO | None = None, *, is_tty: bool | None = None, plain_every: int | None = None,
                 window: int = 10) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self.plain_every = plain_every
        self.window = window
        self.losses: list[float] = []
        self._open_line = False

    def __call__(self, info: dict[str, Any]) -> None:
        loss = float(info["lm_loss"])
        self.losses.append(loss)
        iteration, total = int(info["iteration"]), int(info["train_iters"])
        recent = [x for x in self.losses[-self.window:] if math.isfinite(x)]
        mean = sum(recent) / len(recent) if recent else float("nan")
        line = (f"iter {iteration:>{len(str(total))}d}/{total} | loss {mean:6.3f} | "
                f"{info['tokens_per_sec']:7,.0f} tok/s | lr {info['lr']:.2e} | elapsed {_clock(info['elapsed_s'])} | "
                f"ETA {_clock(info['eta_s'])}")
        if self.is_tty:
            width = 24
            filled = int(width * iteration / max(total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {line}\x1b[K")
            self._open_line = True
            if iteration >= total:
                self.close()
        else:
            every = self.plain_every or max(1, total // 20)
            if iteration == 1 or iteration % every == 0 or iteration >= total:
                self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line (also after an interrupted run), so later output starts on a fresh line."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


# ----------------------------------------------------------------------------------------------------------------
# Loss curve
# ----------------------------------------------------------------------------------------------------------------


def _centered_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean over a window centred on each point, narrowed symmetrically at the ends (the first point is itself):
    smooths without the lag of a trailing mean and without pulling the steep start of the curve down."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    n = len(values)
    for i in range(n):
        half = min(window // 2, i, n - 1 - i)
        out.append((prefix[i + half + 1] - prefix[i - half]) / (2 * half + 1))
    return out


def plot_loss_curve(path: str, losses: Sequence[float], *, ln_vocab: float, valid_loss: float | None = None,
                    title: str = "") -> None:
    """Write the training loss curve (per iteration, and a moving average) to ``path`` as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    iterations = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        ax.plot(iterations, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (per iteration)")
        window = max(1, min(21, len(losses) // 10) | 1)
        ax.plot(iterations, _centered_mean(losses, window), color="tab:blue", linewidth=2.0,
                label=f"train loss ({window}-iteration centred mean)")
        ax.axhline(ln_vocab, color="tab:gray", linestyle="--", linewidth=1.0,
                   label=f"ln(vocab) = {ln_vocab:.2f} (uniform guess)")
        if valid_loss is not None and math.isfinite(valid_loss):
            ax.scatter([len(losses)], [valid_loss], color="tab:red", zorder=3,
                       label=f"validation loss = {valid_loss:.2f}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(title or "training loss")
        ax.set_ylim(bottom=0.0, top=max(ln_vocab, max(losses)) * 1.12)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.87), fontsize=8)  # below the ln(vocab) line
        fig.tight_layout()
        tmp = f"{path}.tmp{os.getpid()}.png"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One generated continuation and how it was produced."""

    prompt: str
    continuation: str
    method: str
    num_tokens: int
    seconds: float


def split_trailing_spaces(prompt: str) -> tuple[str, str]:
    """``"def "`` -> ``("def", " ")``: the part to tokenize and the trailing spaces the next token must begin with.

    Why: byte-level BPE joins a space to the word after it (``" foo"`` is one token), so a prompt that ends in a space
    would end on a lone ``" "`` token that the model has almost never seen before a word. Tokenizing without the
    space and requiring the first generated token to start with it ("token healing") keeps the prompt's meaning.
    """
    head = prompt.rstrip(" ")
    if not head or head == prompt:
        return prompt, ""
    return head, prompt[len(head):]


def _pick_token(logits: Any, temperature: float, top_k: int, generator: Any) -> int:
    """One token from ``logits`` [vocab]: argmax at temperature 0, else top-k / temperature sampling."""
    import torch

    if temperature == 0.0 or top_k == 1:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def generate_sample(checkpoint_dir: str, prompt: str, max_new_tokens: int, *, temperature: float, top_k: int,
                    seed: int) -> tuple[Sample, str]:
    """Load the saved checkpoint (weights and the tokenizer copied into it) and continue ``prompt``.

    Uses the cached :class:`~megatron_hybrid.inference.InferenceEngine`; if it cannot be used, falls back to greedy
    decoding by full re-computation and says so. A prompt ending in spaces is healed (see
    :func:`split_trailing_spaces`): its first token is picked here among the tokens that start with those spaces.
    Returns the sample and the iteration directory loaded.
    """
    import torch

    from megatron_hybrid.checkpoint import load_model_for_inference, resolve_checkpoint_dir
    from megatron_hybrid.tokenizers import build_tokenizer

    directory = resolve_checkpoint_dir(checkpoint_dir, None)
    model, config, tokenizer_args = load_model_for_inference(checkpoint_dir, device="cpu")
    tokenizer = build_tokenizer(**tokenizer_args)
    eod = tokenizer.eod
    head, tail = split_trailing_spaces(prompt)
    prompt_ids = list(tokenizer.tokenize(head))
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    first_text = ""
    healed = False
    if tail and max_new_tokens > 0:
        allowed = torch.tensor([tokenizer.detokenize([i]).startswith(tail) and i != eod
                                for i in range(config.vocab_size)])
        if bool(allowed.any()):
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids]))[0, -1]
            first = _pick_token(logits.masked_fill(~allowed, float("-inf")), temperature, top_k, generator)
            prompt_ids.append(first)
            first_text = tokenizer.detokenize([first])[len(tail):]
            max_new_tokens -= 1
            healed = True
    if not healed:  # nothing to heal (or no token starts with those spaces): the prompt as it is
        head, tail = prompt, ""
        prompt_ids = list(tokenizer.tokenize(prompt)) or [eod]  # empty prompt: start a new document
    ids: list[int] = []
    try:
        from megatron_hybrid.inference import InferenceEngine, SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                stop_token_ids=(eod,))
        engine = InferenceEngine(model, tokenizer, max_batch_size=1,
                                 max_sequence_length=len(prompt_ids) + max_new_tokens + 1)
        try:
            output = engine.generate([prompt_ids], params)[0]
        finally:
            engine.close()
        ids = [t for t in output.token_ids if t != eod]
        text = output.text if output.text is not None else tokenizer.detokenize(ids)
        how = "greedy" if params.greedy else f"temperature {temperature}, top-k {top_k}, seed {seed}"
        method = f"InferenceEngine ({how})"
    except Exception as exc:  # noqa: BLE001 - the demo must still show the trained model; the reason is printed
        print(f"note: the inference engine could not be used ({type(exc).__name__}: {exc}); "
              "falling back to greedy decoding by full re-computation", file=sys.stderr)
        with torch.no_grad():
            context = torch.tensor([prompt_ids])
            for _ in range(max_new_tokens):
                next_id = int(model(context)[0, -1].argmax())
                if next_id == eod:
                    break
                ids.append(next_id)
                context = torch.cat([context, torch.tensor([[next_id]])], dim=1)
        text = tokenizer.detokenize(ids)
        method = "greedy, full re-computation (fallback)"
    if healed:
        method += f"; first token healed (must start with the prompt's trailing {tail!r})"
    return Sample(head + tail, first_text + text, method, len(ids) + healed, time.perf_counter() - t0), str(directory)


# ----------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Threads for torch: the CPUs this process may use, at most 8 (a 4M-parameter model gains little beyond)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def _prepare_run_dir(run_dir: str) -> None:
    """Start from an empty ``run_dir``; only a directory this demo created (it holds our marker) is ever wiped."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not os.path.isfile(os.path.join(run_dir, RUN_MARKER)):
            raise SystemExit(f"demo: {run_dir} exists and was not created by the demo; refusing to overwrite it "
                             "(choose another --work-dir)")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, RUN_MARKER), "w", encoding="utf-8") as f:
        f.write("created by python -m megatron_hybrid.demo; wiped at the start of every demo run\n")


def _check_dependencies() -> None:
    """Fail in the first second, not after the training, when an optional package of the demo is missing."""
    import importlib.util

    missing = [name for name in ("tokenizers", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"demo: missing Python packages {', '.join(missing)}; install the development extras "
                         "(make venv, or pip install -e '.[dev]')")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    p = argparse.ArgumentParser(prog="python -m megatron_hybrid.demo",
                                description="Train the tiny hybrid model on the Python standard library's source on "
                                            "CPU, save a checkpoint and a loss curve, and generate from it.")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                   help="cached corpus / tokenizer / dataset and the run's outputs (default: %(default)s)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"training iterations (default: {FULL.train_iters}; {QUICK.train_iters} with --quick)")
    p.add_argument("--seed", type=int, default=1234, help="seed of weights, data order and sampling")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run: small corpus subset, small vocabulary, short sequences")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: usable CPUs, at most 8)")
    p.add_argument("--prompt", default="def ", help="prompt of the sample generation (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="length of the sample generation")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=20, help="top-k of the sampling (0: off)")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def _progress_log(prefix: str = "") -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"{prefix}{message}", flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 0 on success."""
    args = parse_args(argv)
    _check_dependencies()
    settings = QUICK if args.quick else FULL
    if args.iters is not None:
        settings = dataclasses.replace(settings, train_iters=args.iters,
                                       warmup_iters=min(settings.warmup_iters, max(0, args.iters // 10)))
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else settings.max_new_tokens
    threads = args.threads or default_threads()
    start = time.perf_counter()
    log = _progress_log()

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (the demo called twice from Python)
        pass

    work_dir = os.path.abspath(args.work_dir)
    py = "".join(sys.version.split()[0].split(".")[:2])
    data_dir = os.path.join(work_dir, "data", f"stdlib-py{py}-{settings.name}-bpe{settings.vocab_size}")
    run_dir = os.path.join(work_dir, "run-quick" if args.quick else "run")
    print(f"megatron_hybrid demo ({settings.name}): work dir {work_dir}, {threads} torch threads (OpenMP wait "
          f"policy {os.environ.get('OMP_WAIT_POLICY', 'default').lower()})", flush=True)

    print("\n== data: Python standard library source -> BPE tokenizer -> Megatron indexed dataset", flush=True)
    data = prepare_data(data_dir, settings, log)
    setup_s = time.perf_counter() - start

    from megatron_hybrid.training import TrainingAborted, make_run_config, pretrain

    global_batch = settings.micro_batch_size
    train_iters = settings.train_iters
    run = make_run_config(
        model_preset="tiny",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        seq_length=settings.seq_length,
        micro_batch_size=settings.micro_batch_size,
        global_batch_size=global_batch,
        train_iters=train_iters,
        lr=settings.lr,
        min_lr=settings.min_lr,
        lr_decay_style="cosine",
        lr_warmup_iters=settings.warmup_iters,
        weight_decay=0.1,
        clip_grad=1.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        seed=args.seed,
        data_path=[data.data_prefix],
        split=settings.split,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=data.tokenizer_dir,
        save=run_dir,
        log_interval=1,
        eval_interval=train_iters,
        eval_iters=settings.eval_iters,
    )
    _prepare_run_dir(run_dir)
    tokens_per_iter = global_batch * settings.seq_length
    print(f"\n== training the 'tiny' preset: {train_iters} iterations x {global_batch} x {settings.seq_length} tokens "
          f"({train_iters * tokens_per_iter:,} tokens; the corpus has {data.num_tokens:,}), "
          f"lr {settings.lr:g} cosine -> {settings.min_lr:g}, warmup {settings.warmup_iters}", flush=True)
    progress = ProgressDisplay()
    t0 = time.perf_counter()
    try:
        result = pretrain(run, on_iteration=progress, verbose=False)
    except TrainingAborted as exc:
        progress.close()  # end the progress line before the message
        print(f"demo: training aborted: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    train_s = time.perf_counter() - t0
    assert result.config is not None and result.tokenizer is not None and result.model is not None
    config = result.config
    n_params = sum(p.numel() for p in result.model.parameters())
    vocab = result.tokenizer.vocab_size
    ln_v = math.log(vocab)

    losses = [float(r["lm_loss"]) for r in result.history if r.get("kind", "train") == "train"]
    if not losses:
        losses = progress.losses
    tail = max(1, min(10, len(losses) // 5))
    start_loss, end_loss = losses[0], sum(losses[-tail:]) / tail
    valid = [e for e in result.evaluations if e["kind"] == "valid"]
    valid_loss = float(valid[-1]["lm_loss"]) if valid else None
    png = os.path.join(run_dir, "loss_curve.png")
    plot_loss_curve(png, losses, ln_vocab=ln_v, valid_loss=valid_loss,
                    title=f"tiny hybrid {config.layer_pattern} ({n_params / 1e6:.1f}M params) on the Python "
                          f"stdlib, vocab {vocab}")
    tokens_per_s = len(losses) * tokens_per_iter / max(train_s, 1e-9)
    print(f"model      {config.layer_pattern} ({n_params / 1e6:.2f}M parameters), vocab {vocab} "
          f"(padded {config.padded_vocab_size})")
    print(f"trained    {len(losses)} iterations in {_clock(train_s)} ({train_s:.0f}s, {tokens_per_s:,.0f} tokens/s)")
    print(f"loss       start {start_loss:.3f} (ln V = {ln_v:.3f})  ->  end {end_loss:.3f} "
          f"(mean of the last {tail} iterations)"
          + (f"; validation {valid_loss:.3f}" if valid_loss is not None else ""))

    print(f"\n== sample from the saved checkpoint (prompt {args.prompt!r})", flush=True)
    sample, loaded = generate_sample(run_dir, args.prompt, max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed)
    rule = "-" * 78
    print(f"{sample.method}, {sample.num_tokens} tokens in {sample.seconds:.1f}s")
    print(rule)
    print(f"{sample.prompt}\x1b[1m{sample.continuation}\x1b[0m" if sys.stdout.isatty()
          else sample.prompt + sample.continuation)
    print(rule)
    print("(the prompt is followed directly by the model's continuation"
          + (", shown in bold)" if sys.stdout.isatty() else ")"))

    sample_path = os.path.join(run_dir, "sample.txt")
    _atomic_write_text(sample_path, f"# method: {sample.method}\n# prompt: {sample.prompt!r}\n"
                                    f"{sample.prompt}{sample.continuation}\n")
    total_s = time.perf_counter() - start
    summary = {
        "settings": dataclasses.asdict(settings),
        "seed": args.seed,
        "threads": threads,
        "model": {"layer_pattern": config.layer_pattern, "parameters": n_params, "vocab_size": vocab},
        "corpus": {k: data.corpus_manifest[k] for k in ("python", "documents", "text_bytes")},
        "dataset_tokens": data.num_tokens,
        "reused": data.reused,
        "losses": {"ln_vocab": ln_v, "start": start_loss, "end": end_loss, "valid": valid_loss},
        "seconds": {"setup": setup_s, **data.timings, "train": train_s, "total": total_s},
        "tokens_per_sec": tokens_per_s,
        "sample": dataclasses.asdict(sample),
        "checkpoint": loaded,
        "loss_curve": png,
        "metrics": result.metrics_path,
    }
    summary_path = os.path.join(run_dir, "summary.json")
    _atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")

    print("\n== outputs")
    print(f"checkpoint {loaded}")
    print(f"loss curve {png}")
    print(f"metrics    {result.metrics_path} (one JSON line per iteration)")
    print(f"sample     {sample_path}")
    print(f"summary    {summary_path}")
    print(f"total      {_clock(total_s)} (data {setup_s:.0f}s"
          + (f", reused {', '.join(data.reused)}" if data.reused else "") + f", training {train_s:.0f}s)")
    return 0


_REEXEC_MARK = "MEGATRON_HYBRID_DEMO_REEXEC"


def ensure_passive_openmp(argv: Sequence[str]) -> None:
    """Make OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose.

    Why: on a laptop or a shared machine something else is usually running. Spinning threads then steal the cores
    their partner thread needs and a training step gets several times slower (measured on 2 cores with one other
    busy process: 1.3-6.7 s per step spinning vs 0.8 s passive; idle machine: 0.43 vs 0.50 s). The OpenMP runtime
    reads the variable when it loads, i.e. when ``import megatron_hybrid`` imports torch, before this module runs
    under ``python -m``; so the process re-executes itself once with the variable set (POSIX only).
    """
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get(_REEXEC_MARK) or os.name != "posix":
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", _REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "megatron_hybrid.demo", *argv], env)


if __name__ == "__main__":
    ensure_passive_openmp(sys.argv[1:])
    sys.exit(main())
