"""Activation-memory audit on the CPU: bytes saved for backward per layer type, ours vs transformers' NemotronH.

Runs one forward of the 800M configuration (``gpu_model.config_800m``) at a short sequence under
``torch.autocast("cpu", bfloat16)`` with float32 parameters (the GPU training recipe), records every tensor that
autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), de-duplicates them by storage and
attributes each storage to the innermost module that saved it first. Parameters are not counted; bf16 copies of
weights that autocast makes and a matmul saves are reported apart (they do not grow with the tokens).

The CPU path is not the GPU path: the Mamba mixer kernels (mamba_ssm's scan and gated norm, the conv, the RMSNorm)
save different tensors on CUDA than our CPU references. ``--gpu-like`` (the default) swaps them for stand-ins that
save exactly what the GPU kernels save (their saved tensors are read from their sources: ``MambaChunkScanCombinedFn``
saves out, x, dt, dA_cumsum, A, B, C, D, dt_bias; ``LayerNormFn`` saves x, weight, rstd, z; our Triton conv saves its
input view; transformers' training path calls ``mamba_split_conv1d_scan_combined``, which saves zxbcdt, out_x, rstd
and the bf16 out_proj weight and recomputes the conv and norm outputs). ``--conv torch`` models the old GPU fallback
of the conv (PyTorch's float32 depthwise conv: saves the padded float32 input and the float32 pre-activation).

Prints per-token bytes per layer type, the biggest saved items, and an estimate of the GPU peak of a training step
(fused AdamW, float32 params) at batch 2 and 4 x 4096. Writes JSON to $OUT/activation_memory.json when $OUT is set.

``--loss`` picks the CUDA loss modelled: ``triton`` (default; ours at tensor-parallel size 1, which saves the bf16
logits and writes its gradient over them: no loss transient), ``chunked`` (the tensor-parallel path) or ``old``.

    python benchmarks/activation_memory.py [--seq 640] [--model ours|hf|both] [--conv triton|torch] [--loss triton]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_model import config_800m  # noqa: E402

from megatron_hybrid.models.mamba_model import MambaModel  # noqa: E402
from megatron_hybrid.ops import causal_conv1d_ref, gated_rms_norm_ref, rms_norm_ref, ssd_chunk_scan_ref  # noqa: E402
from megatron_hybrid.parallel.state import ParallelGroups  # noqa: E402

GB = 1e9
SINGLE = ParallelGroups.single()


class _SavesLike(torch.autograd.Function):
    """Computes ``compute(*inputs)`` and saves ``save(inputs, out)``: what a GPU kernel keeps, for counting only."""

    @staticmethod
    def forward(ctx, compute: Callable, save: Callable, *inputs):
        with torch.autocast("cpu", enabled=False):  # the references compute in float32 themselves
            out = compute(*inputs)
        ctx.save_for_backward(*[t for t in save(inputs, out) if t is not None])
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("audit stand-in: no backward")


def _scan_gpu_like(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, return_final_states=False,
                   backend="auto"):
    b, l, h, _ = x.shape
    nchunks = -(-l // chunk_size)

    def compute(x, dt, A, B, C, D, dt_bias):
        return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  dt_limit=dt_limit, seq_idx=seq_idx)

    def save(inputs, out):
        x, dt, A, B, C, D, dt_bias = inputs
        dA_cumsum = torch.empty(b, h, nchunks, chunk_size, dtype=torch.float32)
        return out, x, dt, dA_cumsum, A, B, C, D, dt_bias

    y = _SavesLike.apply(compute, save, x, dt, A, B, C, D, dt_bias)
    if return_final_states:
        return y, torch.zeros(b, h, x.shape[-1], B.shape[-1])
    return y


def _gated_norm_gpu_like(x, z, weight, eps, group_size=None, norm_before_gate=False, *, backend="auto"):
    groups = x.shape[-1] // (group_size or x.shape[-1])

    def compute(x, z, weight):
        return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)

    def save(inputs, out):
        x, z, weight = inputs
        rows = x.numel() // x.shape[-1]
        return x.reshape(-1, x.shape[-1]), weight, torch.empty(rows * groups), z.reshape(-1, z.shape[-1])

    return _SavesLike.apply(compute, save, x, z, weight)


def _rms_norm_gpu_like(x, weight, eps, *, backend="auto"):
    def save(inputs, out):
        x, weight = inputs
        return x.reshape(-1, x.shape[-1]), weight, torch.empty(x.numel() // x.shape[-1])

    return _SavesLike.apply(lambda x, weight: rms_norm_ref(x, weight, eps), save, x, weight)


def _conv_gpu_like(kind: str) -> Callable:
    def conv(x, weight, bias=None, activation=None, *, seq_idx=None, initial_states=None, return_final_states=False,
             backend="auto"):
        def compute(x, weight, bias):
            return causal_conv1d_ref(x.transpose(1, 2), weight, bias, activation, seq_idx=seq_idx).transpose(1, 2)

        def save(inputs, out):
            x, weight, bias = inputs
            if kind == "triton":
                return x, weight, bias
            b, l, d = x.shape  # torch fallback: float32 padded input (conv1d) and float32 pre-activation (silu)
            return (torch.empty(b, l + weight.shape[1] - 1, d), weight, bias, torch.empty(b, d, l))

        return _SavesLike.apply(compute, save, x, weight, bias)

    return conv


def _loss_gpu_like(kind: str) -> tuple[Callable, Callable]:
    """The CUDA loss path: output layer, then our Triton CE (``triton``: tensor-parallel size 1, saves the logits and
    writes its gradient over them), the chunked CE (``chunked``: tensor parallelism; saves a logits-sized gradient) or
    the float32 softmax-saving one (``old``)."""
    import torch.nn.functional as F

    from megatron_hybrid.parallel import cross_entropy

    def vocab_ce(logits, target, groups, **kwargs):
        if kind == "old":
            return cross_entropy._VocabParallelCrossEntropy.apply(logits.float(), target, groups.tp)
        if kind == "triton":
            return _SavesLike.apply(
                lambda lg: cross_entropy._LocalCrossEntropy.apply(lg.float(), target),
                lambda inputs, out: (inputs[0], torch.empty(inputs[0].shape[:-1])), logits)  # logits, float32 lse
        return cross_entropy._ChunkedCrossEntropy.apply(logits, target, groups.tp)

    def linear_ce(hidden, weight, target, workspace=None):  # the CPU-only fused branch is not taken on CUDA
        logits = F.linear(hidden, weight)
        return vocab_ce(logits.float() if kind == "old" else logits, target, SINGLE)

    return vocab_ce, linear_ce


@contextlib.contextmanager
def gpu_like_ops(conv_kind: str, loss_kind: str = "triton"):
    """Swap the kernel entry points the layers call for the GPU-shaped stand-ins above."""
    import megatron_hybrid.layers.mamba_mixer as mixer
    import megatron_hybrid.layers.norm as norm
    import megatron_hybrid.models.mamba_model as model

    saved = {(mixer, "ssd_chunk_scan"): mixer.ssd_chunk_scan, (mixer, "gated_rms_norm"): mixer.gated_rms_norm,
             (mixer, "causal_conv1d_channel_last"): mixer.causal_conv1d_channel_last,
             (norm, "rms_norm"): norm.rms_norm}
    for name in ("vocab_parallel_cross_entropy", "linear_cross_entropy"):
        if hasattr(model, name):
            saved[(model, name)] = getattr(model, name)
    mixer.ssd_chunk_scan = _scan_gpu_like
    mixer.gated_rms_norm = _gated_norm_gpu_like
    mixer.causal_conv1d_channel_last = _conv_gpu_like(conv_kind)
    norm.rms_norm = _rms_norm_gpu_like
    model.vocab_parallel_cross_entropy, model.linear_cross_entropy = _loss_gpu_like(loss_kind)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def _hf_fused_mamba_gpu_like(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                             dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
                             rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                             headdim=None, ngroups=1, norm_before_gate=True, **kwargs):
    """What mamba_ssm's ``mamba_split_conv1d_scan_combined`` saves: zxbcdt, out_x, rstd, bf16 out_proj weight."""
    b, l, _ = zxbcdt.shape
    dim = D.shape[0] * headdim
    w_out = outproj_weight.to(zxbcdt.dtype)

    def compute(zxbcdt, w):
        return torch.zeros(b, l, w.shape[0], dtype=zxbcdt.dtype)

    def save(inputs, out):
        zxbcdt, w = inputs
        return zxbcdt, torch.empty(b, l, dim, dtype=zxbcdt.dtype), torch.empty(b * l * ngroups), w

    return _SavesLike.apply(compute, save, zxbcdt, w_out)


class SavedTensorCounter:
    """Attributes unique saved storages to the innermost module (by name) active when they were first saved."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.stack: list[str] = [""]
        self.seen: set[int] = set()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # A saved 2-D tensor shaped like a weight (or its transpose) is autocast's low-precision copy of it.
        self.param_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
        self.items: list[dict] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable:
        def hook(module, args) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.seen and ptr not in self.params and storage.nbytes() > 0:
            self.seen.add(ptr)
            where = self.stack[-1]
            shapes = self.param_shapes
            weight_copy = t.dim() == 2 and (tuple(t.shape) in shapes or tuple(t.shape)[::-1] in shapes)
            self.items.append({"module": where, "bytes": storage.nbytes(), "shape": tuple(t.shape),
                               "dtype": str(t.dtype).replace("torch.", ""), "weight_copy": weight_copy})
        return t

    @staticmethod
    def unpack(t):
        return t

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _category(module: str, kinds: dict[str, str]) -> str:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        kind = kinds.get(".".join(parts[:i]))
        if kind:
            return kind
    return "embedding+output+loss"


def audit(model: torch.nn.Module, run: Callable[[], torch.Tensor], kinds: dict[str, str], tokens: int,
          layer_counts: dict[str, int]) -> dict:
    counter = SavedTensorCounter(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run()
    counter.close()
    del loss
    per_kind: dict[str, dict] = collections.defaultdict(lambda: {"activation_bytes": 0, "weight_copy_bytes": 0})
    by_item: dict[tuple, int] = collections.Counter()
    for item in counter.items:
        kind = _category(item["module"], kinds)
        key = "weight_copy_bytes" if item["weight_copy"] else "activation_bytes"
        per_kind[kind][key] += item["bytes"]
        if not item["weight_copy"]:
            # Strip the layer index so the same item of every layer of a kind adds up.
            module = ".".join(p for p in item["module"].split(".") if not p.isdigit())
            by_item[(kind, module, item["dtype"], item["shape"][-1] if item["shape"] else 0)] += item["bytes"]
    result = {}
    for kind, entry in sorted(per_kind.items()):
        layers = layer_counts.get(kind, 1)
        result[kind] = {
            "layers": layers,
            "bytes_per_token_per_layer": round(entry["activation_bytes"] / tokens / layers),
            "bytes_per_token_all_layers": round(entry["activation_bytes"] / tokens),
            "weight_copy_GB": round(entry["weight_copy_bytes"] / GB, 3),
        }
    result["top_items_bytes_per_token"] = [
        {"kind": k[0], "module": k[1], "dtype": k[2], "last_dim": k[3], "bytes_per_token": round(v / tokens)}
        for k, v in sorted(by_item.items(), key=lambda kv: -kv[1])[:25]
    ]
    result["total_bytes_per_token"] = round(sum(e["activation_bytes"] for e in per_kind.values()) / tokens)
    result["weight_copies_GB"] = round(sum(e["weight_copy_bytes"] for e in per_kind.values()) / GB, 3)
    return result


def estimate_peak_GB(audit_result: dict, params: int, batch: int, seqlen: int, head_transient_per_token: float) -> dict:
    """Peak of a training step: float32 params + grads + AdamW states (16 B/param), the saved activations, the bf16
    weight copies, and the transient of the loss/output-layer backward at the start of the backward pass."""
    tokens = batch * seqlen
    static = 16 * params
    acts = audit_result["total_bytes_per_token"] * tokens
    copies = audit_result["weight_copies_GB"] * GB
    transient = head_transient_per_token * tokens
    return {"batch": batch, "seq": seqlen, "static_GB": round(static / GB, 1),
            "saved_activations_GB": round(acts / GB, 1), "weight_copies_GB": round(copies / GB, 1),
            "loss_transient_GB": round(transient / GB, 1),
            "estimated_peak_GB": round((static + acts + copies + transient) / GB, 1)}


def ours(seqlen: int, conv_kind: str, gpu_like: bool, loss_kind: str = "triton") -> dict:
    torch.manual_seed(0)
    config = config_800m()
    model = MambaModel(config)
    model.train()
    kinds = {}
    for name, layer in model.decoder.layers.items():
        kinds[f"decoder.layers.{name}"] = {"MambaLayer": "mamba", "AttentionLayer": "attention",
                                           "MLPLayer": "mlp"}[type(layer).__name__]
    counts = collections.Counter(kinds.values())
    ids = torch.randint(0, config.vocab_size, (1, seqlen))
    ctx = gpu_like_ops(conv_kind, loss_kind) if gpu_like else contextlib.nullcontext()
    with ctx:
        result = audit(model, lambda: model(ids, labels=ids), kinds, seqlen, counts)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["vocab"] = config.padded_vocab_size
    return result


def hf(seqlen: int, gpu_like: bool) -> dict:
    import transformers.models.nemotron_h.modeling_nemotron_h as modeling

    from megatron_hybrid.interop.hf import hf_config_from_hybrid

    torch.manual_seed(0)
    config = config_800m()
    hf_config = hf_config_from_hybrid(config)
    hf_config._attn_implementation = "sdpa"
    model = modeling.NemotronHForCausalLM(hf_config)
    model.train()
    kinds = {}
    for i, block in enumerate(model.model.layers):
        kinds[f"model.layers.{i}"] = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                                      "attention": "attention", "mlp": "mlp"}[block.block_type]
    counts = collections.Counter(kinds.values())
    ids = torch.randint(0, config.vocab_size, (1, seqlen))
    original = modeling.NemotronHMamba2Mixer.forward
    if gpu_like:
        fused = _hf_fused_mamba_gpu_like

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            projected = self.in_proj(hidden_states)
            return fused(projected, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
                         -torch.exp(self.A_log.float()), self.D, self.chunk_size, rmsnorm_weight=self.norm.weight,
                         outproj_weight=self.out_proj.weight, headdim=self.head_dim, ngroups=self.n_groups)

        modeling.NemotronHMamba2Mixer.forward = forward
    try:
        result = audit(model, lambda: model(input_ids=ids, labels=ids).loss, kinds, seqlen, counts)
    finally:
        modeling.NemotronHMamba2Mixer.forward = original
    result["params"] = sum(p.numel() for p in model.parameters())
    result["vocab"] = hf_config.vocab_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=640)  # not a weight dim: see SavedTensorCounter
    parser.add_argument("--model", default="both", choices=("ours", "hf", "both"))
    parser.add_argument("--conv", default="triton", choices=("triton", "torch"))
    parser.add_argument("--loss", default="triton", choices=("triton", "chunked", "old"),
                        help="the CUDA loss to model: ours at tensor-parallel size 1, the chunked CE (tensor "
                             "parallelism), or the old float32 one")
    parser.add_argument("--cpu-path", action="store_true", help="count the CPU references as they are")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict = {"seq": args.seq, "gpu_like": not args.cpu_path, "conv": args.conv, "loss": args.loss}
    if args.model in ("ours", "both"):
        results["ours"] = ours(args.seq, args.conv, not args.cpu_path, args.loss)
    if args.model in ("hf", "both"):
        results["hf"] = hf(args.seq, not args.cpu_path)
    for name in ("ours", "hf"):
        if name not in results:
            continue
        r = results[name]
        # Vocab-sized temporaries of the loss beyond what it saves, per token: unfused float32 CE (ours before, and
        # transformers with its float32 logits kept alive in the output) ~4 B float32 gradient + 2 B bf16 cast (+ the
        # 2-4 B logits of the forward); the chunked CE only has the bf16 logits alive while it fills its buffer; the
        # Triton CE none (its backward writes the gradient over the saved logits).
        per_vocab = {"hf": 8, "ours": {"triton": 0, "chunked": 2, "old": 6}[args.loss]}[name]
        head = r["vocab"] * per_vocab
        r["gpu_peak_estimates"] = [estimate_peak_GB(r, r["params"], b, 4096, head) for b in (2, 4)]
    text = json.dumps(results, indent=1)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "activation_memory.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
