"""The pretraining entry point and loop (``pretrain_mamba.py``, ``python -m megatron_hybrid.train``, ``pretrain()``).

One iteration (= one optimizer step over ``--global-batch-size`` samples):

1. fetch this rank's ``num_microbatches`` micro batches (global = micro x data-parallel x accumulation); every
   pipeline stage reads the same batches (the first stage uses the tokens, the last the labels and loss mask, all
   of them the positions and document ids);
2. count the loss tokens of the whole global batch (all-reduce over data parallel);
3. forward + backward every micro batch with loss = sum(per-token loss x mask) / global tokens, under bf16
   autocast with ``--bf16`` (fp32 master weights, see :mod:`megatron_hybrid.training.optimizer`), through the
   1F1B pipeline schedule of :mod:`megatron_hybrid.parallel.pipeline` (with one stage: forward + backward per micro
   batch); the last stage's loss is broadcast to every stage;
4. sequence-parallel, data-parallel and tied-embedding gradient sums, global-norm clipping (over tensor and
   pipeline ranks), AdamW step; a step whose loss or gradient norm is NaN/Inf is skipped on every rank (parameters,
   optimizer and LR schedule untouched) and counted, and more than ``--max-consecutive-nan-skips`` in a row abort
   the run;
5. the LR schedule advances by the global batch size (Megatron's sample-based schedule).

Then logging (every ``--log-interval``), validation (every ``--eval-interval``), checkpoint (every
``--save-interval``) and ``--exit-interval``, in that order, then a final checkpoint and validation / test at the end.

Exact resume: the data position is one integer (consumed samples), the model, Adam states, schedule position and
every RNG state are restored, and data-loader creation does not touch the training RNG stream, so a resumed run
continues bit for bit as if it had never stopped (on CPU; CUDA kernels may be non-deterministic).

Metrics: rank 0 prints a Megatron-style line and appends a JSON object per logged iteration to ``--metrics-jsonl``
(default ``<save>/metrics.jsonl``): ``kind`` ("train"), ``iteration``, ``consumed_samples``, ``lm_loss`` (mean
over the logging window), ``lr``, ``grad_norm`` (last step), ``tokens_per_sec``, ``tflops_per_device``, ``mfu``
(null when the peak is unknown), ``ms_per_iteration``, ``skipped_iterations``, ``nan_iterations``, ``memory_gb``.
Validation adds ``{"kind": "valid", "iteration", "lm_loss", "ppl"}`` lines. On resume the file is cut back to the
loaded iteration first, so it always describes one consistent history.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_hybrid.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from megatron_hybrid.config import HybridConfig
from megatron_hybrid.models.mamba_model import MambaModel
from megatron_hybrid.models.pipeline_stage import build_pipeline_stage
from megatron_hybrid.parallel.pipeline import (
    StageIO,
    broadcast_from_last_stage,
    forward_backward_pipelining,
    forward_only_pipelining,
    initialize_pipeline_communication,
)
from megatron_hybrid.parallel.state import ParallelGroups, init_distributed, initialize_parallel_groups
from megatron_hybrid.parallel.tied_embeddings import sync_tied_embedding_weights
from megatron_hybrid.training.arguments import ConfigError, ResolvedRun, RunConfig, parse_args, resolve
from megatron_hybrid.training.cuda_graphs import enable_layer_graphs
from megatron_hybrid.training.data import build_datasets, micro_batches
from megatron_hybrid.training.flops import peak_tflops_for_device, training_flops_per_step
from megatron_hybrid.training.lr_scheduler import OptimizerParamScheduler
from megatron_hybrid.training.optimizer import TrainOptimizer, broadcast_parameters
from megatron_hybrid.training.triton_cache import configure_triton_cache

__all__ = ["TrainResult", "TrainingAborted", "forward_step", "main", "pretrain"]


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (too many NaN/Inf steps in a row, missing checkpoint with
    ``--exit-on-missing-checkpoint``)."""


@dataclass
class TrainResult:
    """What :func:`pretrain` leaves behind (for ``make demo`` and tests)."""

    iteration: int
    consumed_train_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged train record
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: str | None = None
    skipped_iterations: int = 0
    model: MambaModel | None = None  # this rank's stage under pipeline parallelism
    optimizer: TrainOptimizer | None = None
    config: HybridConfig | None = None
    tokenizer: Any = None
    metrics_path: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Env:
    device: torch.device
    groups: ParallelGroups
    rank: int
    world_size: int
    owns_process_group: bool
    verbose: bool = True


def _setup_distributed(run: RunConfig) -> _Env:
    p = run.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = timedelta(minutes=p.distributed_timeout_minutes)
    if dist.is_available() and (dist.is_initialized() or world > 1):
        owns = not dist.is_initialized()
        device = init_distributed(p.distributed_backend, timeout=timeout)
        groups = initialize_parallel_groups(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                            p.context_parallel_size, timeout=timeout)
        return _Env(device, groups, dist.get_rank(), dist.get_world_size(), owns)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    for flag, size in (("--tensor-model-parallel-size", p.tensor_model_parallel_size),
                       ("--pipeline-model-parallel-size", p.pipeline_model_parallel_size)):
        if size > 1:
            raise ConfigError(f"{flag} {size} needs as many processes; launch with torchrun --nproc_per_node N")
    return _Env(device, ParallelGroups.single(), 0, 1, False)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _print0(env: _Env, *args: Any) -> None:
    if env.rank == 0 and env.verbose:
        print(*args, flush=True)


def tokenizer_args(run: RunConfig) -> dict[str, Any]:
    """How to rebuild the run's tokenizer (saved in checkpoints; absolute paths)."""
    t = run.training

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    return {
        "tokenizer_type": t.tokenizer_type,
        "tokenizer_model": absolute(t.tokenizer_model),
        "vocab_file": absolute(t.vocab_file),
        "merge_file": absolute(t.merge_file),
        "vocab_size": t.vocab_size,
        "make_vocab_size_divisible_by": t.make_vocab_size_divisible_by,
    }


def _build_tokenizer(run: RunConfig) -> Any:
    from megatron_hybrid.tokenizers import build_tokenizer

    t = run.training
    return build_tokenizer(t.tokenizer_type, tokenizer_model=t.tokenizer_model, vocab_file=t.vocab_file,
                           merge_file=t.merge_file, vocab_size=t.vocab_size,
                           make_vocab_size_divisible_by=t.make_vocab_size_divisible_by,
                           tp_size=run.parallel.tensor_model_parallel_size)


def _build_scheduler(run: RunConfig, resolved: ResolvedRun) -> OptimizerParamScheduler:
    t = run.training
    return OptimizerParamScheduler(
        init_lr=t.lr_warmup_init,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=resolved.lr_warmup_steps,
        lr_decay_steps=resolved.lr_decay_steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=resolved.start_weight_decay,
        end_wd=resolved.end_weight_decay,
        wd_incr_steps=resolved.wd_incr_steps,
        wd_incr_style=t.weight_decay_incr_style,
        wsd_decay_steps=resolved.lr_wsd_decay_steps,
        lr_wsd_decay_style=t.lr_wsd_decay_style,
    )


# ----------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------


def forward_step(model: MambaModel, batch: dict[str, torch.Tensor], bf16: bool,
                 hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the micro batch of the masked per-token loss (fp32 scalar).

    On a pipeline stage without the output layer: the stage's output hidden states instead; a stage without the
    embedding takes the previous stage's ``hidden_states``.
    """
    device_type = batch["tokens"].device.type
    pre_process, post_process = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        output = model(batch["tokens"] if pre_process else None, labels=batch["labels"] if post_process else None,
                       seq_idx=batch.get("seq_idx"), position_ids=batch.get("position_ids"),
                       hidden_states=hidden_states)
    if not post_process:
        return output
    return (output.float() * batch["loss_mask"]).sum()


def stage_io(model: MambaModel, run: RunConfig, device: torch.device) -> StageIO:
    """What pipeline stages pass each other: ``[s, b, h]`` hidden states (``s / tp`` under sequence parallelism),
    float32 with ``residual_in_fp32`` (the residual stream) else in the parameters' dtype."""
    config, t = model.config, run.training
    seq = t.seq_length // model.groups.tp_size if config.sequence_parallel else t.seq_length
    dtype = torch.float32 if config.residual_in_fp32 else config.params_dtype
    return StageIO((seq, t.micro_batch_size, config.hidden_size), dtype, device)


def _all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(value, group=group)
    return value


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class _StepResult:
    lm_loss: float
    tokens: int
    grad_norm: float
    stepped: bool


def train_step(model: MambaModel, optimizer: TrainOptimizer, batches: Sequence[dict[str, torch.Tensor]],
               run: RunConfig, groups: ParallelGroups) -> _StepResult:
    """Forward/backward over one global batch (this rank's micro batches) and the optimizer step."""
    t = run.training
    optimizer.zero_grad()
    device = next(model.parameters()).device
    local_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        local_tokens += batch["loss_mask"].sum(dtype=torch.float64)
    total_tokens = float(_all_reduce_sum(local_tokens, groups.dp_cp))
    scale = 1.0 / max(total_tokens, 1.0)
    micro_losses = forward_backward_pipelining(
        lambda index, hidden: forward_step(model, batches[index], t.bf16, hidden), len(batches), groups,
        stage_io(model, run, device), loss_scale=scale)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro_loss in micro_losses:  # the last stage's; empty on the others until the broadcast
        loss_sum += micro_loss.double()
    broadcast_from_last_stage(loss_sum, groups)
    optimizer.reduce_gradients()
    lm_loss = float(_all_reduce_sum(loss_sum, groups.dp_cp)) / max(total_tokens, 1.0)
    if not math.isfinite(lm_loss):
        optimizer.zero_grad()
        return _StepResult(lm_loss, int(total_tokens), float("nan"), False)
    grad_norm, stepped = optimizer.clip_and_step(t.clip_grad)
    return _StepResult(lm_loss, int(total_tokens), grad_norm, stepped)


@torch.no_grad()
def evaluate(model: MambaModel, dataset: Any, run: RunConfig, resolved: ResolvedRun, env: _Env) -> dict[str, float]:
    """Mean per-token loss and perplexity over the first ``--eval-iters`` global batches of ``dataset``."""
    model.eval()
    try:
        iterator = micro_batches(dataset, run, env.groups, 0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        tokens = torch.zeros((), dtype=torch.float64, device=env.device)
        io = stage_io(model, run, env.device)
        for _ in range(run.training.eval_iters):  # one global batch at a time through the (forward-only) pipeline
            batches = []
            for _ in range(resolved.num_microbatches):
                batch = next(iterator, None)  # every pipeline stage reads the same data, so all stop together
                if batch is None:
                    break
                batches.append(_to_device(batch, env.device))
            losses = forward_only_pipelining(
                lambda index, hidden, batches=batches: forward_step(model, batches[index], run.training.bf16, hidden),
                len(batches), env.groups, io)
            for micro_loss in losses:
                loss_sum += micro_loss.double()
            for batch in batches:
                tokens += batch["loss_mask"].sum(dtype=torch.float64)
            if len(batches) < resolved.num_microbatches:
                break
        broadcast_from_last_stage(loss_sum, env.groups)
        _all_reduce_sum(loss_sum, env.groups.dp_cp)
        _all_reduce_sum(tokens, env.groups.dp_cp)
    finally:
        model.train()
    loss = float(loss_sum) / float(tokens) if float(tokens) > 0 else float("nan")
    return {"lm_loss": loss, "ppl": math.exp(min(20.0, loss)), "tokens": float(tokens)}


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


class _MetricsWriter:
    """Rank 0's JSON-lines file and optional TensorBoard writer."""

    def __init__(self, env: _Env, path: str | None, tensorboard_dir: str | None, resume_iteration: int | None
                 ) -> None:
        self.path = path if env.rank == 0 else None
        self.tb = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if resume_iteration is not None and os.path.exists(self.path):
                self._truncate(resume_iteration)
        if tensorboard_dir and env.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(f"warning: --tensorboard-dir {tensorboard_dir} is set but TensorBoard is not installed "
                      "(pip install tensorboard); continuing without TensorBoard", file=sys.stderr, flush=True)
            else:
                self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)

    def _truncate(self, iteration: int) -> None:
        """Drop records past ``iteration`` (written by a run that died after its last checkpoint)."""
        assert self.path is not None
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
                    kept.append(json.dumps(record) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["iteration"]
            prefix = "" if record["kind"] == "train" else f"{record['kind']}/"
            for key, value in record.items():
                if key not in ("kind", "iteration") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def pretrain(
    run: RunConfig | Sequence[str] | None = None,
    *,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train as configured by ``run`` (a :class:`RunConfig`, or command-line arguments; default ``sys.argv``).

    Works in a plain single process (no ``torch.distributed`` needed) and under torchrun. ``on_iteration`` gets a
    small dict after every iteration (``iteration``, ``train_iters``, ``lm_loss``, ``lr``, ``grad_norm``,
    ``tokens_per_sec``, ``elapsed_s``, ``eta_s``) for live progress displays; ``on_log`` gets each logged record.
    ``verbose=False`` silences the printed log lines (metrics files and callbacks are unaffected).
    """
    configure_triton_cache()
    if not isinstance(run, RunConfig):
        run = parse_args(run)
    env = _setup_distributed(run)
    env.verbose = verbose
    try:
        return _pretrain(run, env, on_iteration, on_log)
    finally:
        if env.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(run: RunConfig, env: _Env, on_iteration: Callable[[dict[str, Any]], None] | None,
              on_log: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    t, groups = run.training, env.groups
    resolved = resolve(run, env.world_size)
    for note in run.notes:
        _print0(env, f"note: {note}")
    # Every stage starts from the run's seed: build_pipeline_stage replays the draws of the layers before it, so any
    # pipeline size starts from the weights of the pipeline-size-1 model. Afterwards each stage gets its own stream
    # (Megatron's seed + 100 x pipeline rank) so stages do not share dropout masks.
    _seed_everything(t.seed)

    tokenizer = _build_tokenizer(run)
    config = run.model_config(tokenizer.vocab_size)
    model = build_pipeline_stage(config, groups).to(env.device)
    if groups.pp_size > 1:
        _seed_everything(t.seed + 100 * groups.pp_rank)
    initialize_pipeline_communication(groups, env.device)
    sync_tied_embedding_weights(model, groups)
    if groups.dp_cp is not None:  # identical initialisation is by construction; this makes it a guarantee
        broadcast_parameters(list(model.parameters()), groups.dp_cp)
    optimizer = TrainOptimizer(model, groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                               distributed=run.parallel.use_distributed_optimizer)
    scheduler = _build_scheduler(run, resolved)
    if t.enable_cuda_graph:
        if env.device.type != "cuda":
            raise ConfigError(f"--enable-cuda-graph needs a CUDA device; this run is on {env.device.type}")
        enable_layer_graphs(model)
    n_params = sum(p.numel() for p in model.parameters())
    stage = "" if groups.pp_size == 1 else f", pipeline stage 0 holds layers {model.decoder.layer_range}"
    _print0(env, f"> model: {config.layer_pattern} ({n_params / 1e6:.2f}M parameters on this rank{stage}), vocab "
                 f"{tokenizer.vocab_size} (padded {config.padded_vocab_size}); world {env.world_size} = tp "
                 f"{groups.tp_size} x dp {groups.dp_size} x pp {groups.pp_size}; global batch "
                 f"{resolved.global_batch_size} = micro "
                 f"{t.micro_batch_size} x dp {resolved.data_parallel_size} x {resolved.num_microbatches} "
                 f"accumulation; {resolved.train_iters} iterations")

    iteration, consumed, skipped_total, nan_total = 0, 0, 0, 0
    rng_state = None
    resumed_from: int | None = None
    if t.load:
        loaded = load_checkpoint(t.load, model, groups, optimizer=optimizer, iteration=t.ckpt_step,
                                 load_optim=not (t.no_load_optim or t.finetune),
                                 load_rng=not (t.no_load_rng or t.finetune), verify=t.ckpt_verify)
        if loaded is None:
            if t.exit_on_missing_checkpoint:
                raise TrainingAborted(f"--load {t.load} holds no checkpoint and --exit-on-missing-checkpoint is set")
            _print0(env, f"> no checkpoint in {t.load}: training from scratch")
        else:
            for note in loaded.notes:
                _print0(env, f"note: {note}")
            if not t.finetune:
                iteration, consumed = loaded.iteration, loaded.consumed_train_samples
                extra = loaded.metadata.get("extra", {})
                skipped_total, nan_total = extra.get("skipped_iterations", 0), extra.get("nan_iterations", 0)
                if loaded.scheduler_state:
                    for diff in scheduler.load_state_dict(loaded.scheduler_state):
                        _print0(env, f"note: LR schedule differs from the checkpoint's: {diff}")
                rng_state = loaded.rng_state
                resumed_from = iteration
            _print0(env, f"> loaded {loaded.path} (iteration {loaded.iteration}, {loaded.consumed_train_samples} "
                         f"samples){' for finetuning' if t.finetune else ''}")

    train_ds, valid_ds, test_ds = build_datasets(run, resolved, tokenizer)
    train_iter: Iterator[dict[str, torch.Tensor]] | None = None
    if iteration < resolved.train_iters:
        train_iter = micro_batches(train_ds, run, groups, consumed)
    if rng_state is not None:
        set_rng_state(rng_state)  # after every loader exists: the loop continues the saved stream exactly

    metrics_path = t.metrics_jsonl or (os.path.join(t.save, "metrics.jsonl") if t.save else None)
    writer = _MetricsWriter(env, metrics_path, t.tensorboard_dir, resumed_from)
    result = TrainResult(iteration=iteration, consumed_train_samples=consumed, model=model, optimizer=optimizer,
                         config=config,
                         tokenizer=tokenizer, metrics_path=metrics_path, skipped_iterations=skipped_total)
    flops_per_step = training_flops_per_step(config, t.seq_length, resolved.global_batch_size)
    peak = t.peak_tflops
    if peak is None and env.device.type == "cuda":
        peak = peak_tflops_for_device(torch.cuda.get_device_name(env.device), bf16=t.bf16)

    def save(at: int) -> None:
        result.last_checkpoint = save_checkpoint(
            t.save, at, model, groups, optimizer=None if t.no_save_optim else optimizer,
            scheduler_state=scheduler.state_dict(), consumed_train_samples=consumed, run_config=run.to_dict(),
            tokenizer_args=tokenizer_args(run), keep_last_n=t.keep_last_n, save_rng=not t.no_save_rng,
            extra={"skipped_iterations": skipped_total, "nan_iterations": nan_total},
        )
        _print0(env, f"> saved checkpoint {result.last_checkpoint}")

    def run_eval(dataset: Any, kind: str) -> None:
        metrics = evaluate(model, dataset, run, resolved, env)
        record = {"kind": kind, "iteration": iteration, "lm_loss": metrics["lm_loss"], "ppl": metrics["ppl"]}
        result.evaluations.append(record)
        writer.write(record)
        _print0(env, f" {kind} at iteration {iteration:8d} | lm loss: {metrics['lm_loss']:.6E} | "
                     f"lm loss PPL: {metrics['ppl']:.6E}")

    window = {"loss": 0.0, "steps": 0, "iters": 0, "tokens": 0, "start": time.perf_counter(), "paused": 0.0}
    consecutive_nan = 0
    last_saved = iteration if resumed_from is not None else None
    last_eval = None
    start_time = time.perf_counter()
    start_iteration = iteration
    try:
        while iteration < resolved.train_iters:
            assert train_iter is not None
            batches = [_to_device(next(train_iter), env.device) for _ in range(resolved.num_microbatches)]
            lr = scheduler.apply(optimizer.optimizer)[0]
            step = train_step(model, optimizer, batches, run, groups)
            iteration += 1
            consumed += resolved.global_batch_size
            if step.stepped:
                scheduler.step(resolved.global_batch_size)
                consecutive_nan = 0
                window["loss"] += step.lm_loss
                window["steps"] += 1
            else:
                skipped_total += 1
                nan_total += 1
                consecutive_nan += 1
                _print0(env, f"warning: iteration {iteration}: loss {step.lm_loss} / grad norm {step.grad_norm} is "
                             f"not finite; step skipped ({consecutive_nan} in a row)")
                if consecutive_nan > t.max_consecutive_nan_skips:
                    raise TrainingAborted(
                        f"{consecutive_nan} consecutive iterations (up to {iteration}) had a NaN/Inf loss or "
                        f"gradient norm, more than --max-consecutive-nan-skips {t.max_consecutive_nan_skips}; "
                        "aborting (lower --lr, check the data, or resume from the last checkpoint)")
            window["iters"] += 1
            window["tokens"] += resolved.global_batch_size * t.seq_length
            result.iteration, result.consumed_train_samples, result.skipped_iterations = \
                iteration, consumed, skipped_total

            if on_iteration is not None:
                elapsed = time.perf_counter() - start_time
                done = iteration - start_iteration
                on_iteration({
                    "iteration": iteration, "train_iters": resolved.train_iters, "lm_loss": step.lm_loss, "lr": lr,
                    "grad_norm": step.grad_norm, "skipped": not step.stepped,
                    "tokens_per_sec": done * resolved.global_batch_size * t.seq_length / max(elapsed, 1e-9),
                    "elapsed_s": elapsed, "eta_s": elapsed / done * (resolved.train_iters - iteration),
                })

            if iteration % t.log_interval == 0:
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                seconds = time.perf_counter() - window["start"] - window["paused"]
                per_iter = seconds / max(window["iters"], 1)
                tflops = flops_per_step * window["iters"] / max(seconds, 1e-9) / env.world_size / 1e12
                record = {
                    "kind": "train",
                    "iteration": iteration,
                    "consumed_samples": consumed,
                    "lm_loss": window["loss"] / window["steps"] if window["steps"] else float("nan"),
                    "lr": lr,
                    "grad_norm": step.grad_norm,
                    "tokens_per_sec": window["tokens"] / max(seconds, 1e-9),
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak if peak else None,
                    "ms_per_iteration": per_iter * 1000.0,
                    "skipped_iterations": skipped_total,
                    "nan_iterations": nan_total,
                    "memory_gb": _memory_gb(env.device),
                }
                result.history.append(record)
                writer.write(record)
                if on_log is not None:
                    on_log(record)
                mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
                _print0(env, f" iteration {iteration:8d}/{resolved.train_iters:8d} | consumed samples: {consumed:12d}"
                             f" | elapsed time per iteration (ms): {per_iter * 1000:.1f} | learning rate: {lr:.6E}"
                             f" | global batch size: {resolved.global_batch_size:5d} | lm loss: "
                             f"{record['lm_loss']:.6E} | grad norm: {step.grad_norm:.3f} | tokens/s: "
                             f"{record['tokens_per_sec']:.0f} | TFLOP/s/device: {tflops:.2f} | MFU: {mfu} | "
                             f"skipped iterations: {skipped_total} | mem (GB): {record['memory_gb']:.2f}")
                window = {"loss": 0.0, "steps": 0, "iters": 0, "tokens": 0, "start": time.perf_counter(),
                          "paused": 0.0}

            paused_from = time.perf_counter()
            if valid_ds is not None and t.eval_iters > 0 and iteration % t.eval_interval == 0:
                run_eval(valid_ds, "valid")
                last_eval = iteration
            if t.save and t.save_interval and iteration % t.save_interval == 0:
                save(iteration)
                last_saved = iteration
            if t.exit_interval and iteration % t.exit_interval == 0:
                _print0(env, f"> exiting at iteration {iteration} (--exit-interval {t.exit_interval})")
                break
            window["paused"] += time.perf_counter() - paused_from

        if t.save and last_saved != iteration and iteration > 0:
            save(iteration)
        if valid_ds is not None and t.eval_iters > 0 and last_eval != iteration and iteration > 0:
            run_eval(valid_ds, "valid")
        if test_ds is not None and t.eval_iters > 0 and iteration > 0:
            run_eval(test_ds, "test")
    finally:
        writer.close()
    return result


def main(argv: Sequence[str] | None = None, prog: str = "pretrain_mamba.py") -> int:
    """Command-line entry: parse, train; exit status 2 on bad arguments, 1 on an aborted run."""
    configure_triton_cache()
    try:
        run = parse_args(argv)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        pretrain(run)
    except (ConfigError, CheckpointError, TrainingAborted) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1 if not isinstance(exc, ConfigError) else 2
    return 0
