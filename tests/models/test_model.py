"""Model-level acceptance tests of MambaModel in one process.

* packed sequences (``seq_idx``) compute exactly what each document computes alone, RoPE positions included;
* the loss path is cross entropy of the (padded) logits, in value and gradient;
* tied and untied embeddings;
* pipeline stages (``pre_process`` / ``post_process`` / ``layer_range``) chained through ``hidden_states`` give the
  whole model, forward and backward, with weights moved between layouts by state-dict name alone;
* a custom ``ModuleSpec`` changes what is built;
* parameter counts: the closed form of ``models.param_count`` against meta-device instantiation, for the named
  presets (800M and 8B from Megatron-LM's examples/mamba/train.sh) and many random configurations;
* ``residual_in_fp32`` keeps the residual stream float32 between bf16 layers.

Float32 comparisons use ``max|a - b| <= 1e-5 * max|b|`` (relative to the reference tensor's largest entry).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.config import HybridConfig
from megatron_hybrid.layers.attention import SDPAttention, SelfAttention, document_causal_mask
from megatron_hybrid.layers.hybrid_layers import AttentionLayer, MambaLayer, MLPLayer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.models.layer_pattern import split_pattern_for_pipeline
from megatron_hybrid.models.mamba_model import MambaModel, count_parameters, document_position_ids
from megatron_hybrid.models.param_count import (
    attention_layer_parameters,
    mamba_layer_parameters,
    mlp_layer_parameters,
    parameter_count_formula,
)
from megatron_hybrid.models.presets import NEMOTRON_SENTENCEPIECE_VOCAB, PRESETS, get_preset
from megatron_hybrid.models.specs import local_stack_spec
from megatron_hybrid.spec import ModuleSpec

TOL = 1e-5
SEED = 7


def _config(**overrides: object) -> HybridConfig:
    """Six layers of all three types, GQA, RoPE, SwiGLU; Mamba chunks of 8 tokens (smaller than the documents)."""
    base = dict(
        num_layers=6,
        hybrid_override_pattern="M*-M-*",
        hidden_size=64,
        vocab_size=100,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=96,
        activation="swiglu",
        position_embedding_type="rope",
        mamba_num_heads=8,
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_state_dim=16,
        mamba_chunk_size=8,
        init_method_std=0.05,
    )
    base.update(overrides)
    return HybridConfig(**base)


def _build(config: HybridConfig, seed: int = SEED, **kwargs: object) -> MambaModel:
    torch.manual_seed(seed)
    return MambaModel(config, **kwargs)


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _ids(batch: int, seq: int, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _count(model: MambaModel, symbol: str) -> int:
    return model.config.layer_pattern.count(symbol)


def _seq_idx(documents: list[list[int]]) -> torch.Tensor:
    """Rows of document lengths -> seq_idx [rows, sum(lengths)] with ids 0, 1, 2, ... per row."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in documents], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Packed sequences.


def test_document_position_ids_restart_per_document() -> None:
    seq_idx = _seq_idx([[3, 1, 4], [8]])
    expected = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(document_position_ids(seq_idx), expected)


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_packed_documents_equal_separate_documents(chunk_size: int) -> None:
    """Documents of 5/13/9/5 and 20/12 tokens; with chunks of 8 every boundary but one falls inside a chunk."""
    model = _build(_config(mamba_chunk_size=chunk_size)).eval()
    documents = [[5, 13, 9, 5], [20, 12]]
    ids, seq_idx = _ids(2, 32), _seq_idx(documents)
    rotary_positions = []
    hooks = [
        layer.self_attention.rotary.register_forward_pre_hook(lambda module, args: rotary_positions.append(args[0]))
        for layer in model.decoder.layers.values()
        if isinstance(layer, AttentionLayer)
    ]
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)
        for hook in hooks:
            hook.remove()
        unpacked = model(ids)
        explicit_positions = model(ids, seq_idx=seq_idx, position_ids=document_position_ids(seq_idx))
        for row, lengths in enumerate(documents):
            start = 0
            for length in lengths:
                alone = model(ids[row : row + 1, start : start + length])
                err = _err(packed[row : row + 1, start : start + length], alone)
                assert err <= TOL, f"row {row}, document at {start} (length {length}): deviates by {err:.3g}"
                start += length
    # RoPE positions restart at every document: the attention layers were handed per-document positions. (RoPE is
    # relative, so within a masked document a shift of all positions changes the logits by round-off only; the
    # restart matters for float32 accuracy at large offsets and for matching a model run on the document alone.)
    assert len(rotary_positions) == _count(model, "*")
    for positions in rotary_positions:
        assert torch.equal(positions, document_position_ids(seq_idx))
    assert positions[0].tolist() == [*range(5), *range(13), *range(9), *range(5)]
    assert torch.equal(explicit_positions, packed)
    # The test can fail: without seq_idx, information leaks across documents.
    assert _err(unpacked[0, 5:], packed[0, 5:]) > 1e-3
    assert _err(unpacked[:, :5], packed[:, :5]) <= TOL  # the first document has nothing before it


def test_packed_documents_loss_and_gradients() -> None:
    """The loss path with seq_idx: per-token loss of each packed document equals its loss run alone."""
    model = _build(_config())
    ids, labels = _ids(1, 24), _ids(1, 24, seed=1)
    seq_idx = _seq_idx([[11, 13]])
    packed = model(ids, labels=labels, seq_idx=seq_idx)
    alone = torch.cat([model(ids[:, :11], labels=labels[:, :11]), model(ids[:, 11:], labels=labels[:, 11:])], dim=1)
    assert _err(packed, alone) <= TOL
    grads_packed = torch.autograd.grad(packed.sum(), list(model.parameters()))
    grads_alone = torch.autograd.grad(alone.sum(), list(model.parameters()))
    for (name, _), g_packed, g_alone in zip(model.named_parameters(), grads_packed, grads_alone):
        assert _err(g_packed, g_alone) <= TOL, name


# ---------------------------------------------------------------------------------------------------------------------
# Loss path, embeddings.


def test_loss_path_equals_cross_entropy_of_logits() -> None:
    model = _build(_config())
    ids, labels = _ids(2, 16), _ids(2, 16, seed=1)
    loss = model(ids, labels=labels)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 16)
    assert _err(loss, expected) <= TOL
    weights = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    for (name, _), g_loss, g_ce in zip(
        model.named_parameters(),
        torch.autograd.grad((loss * weights).sum(), params),
        torch.autograd.grad((expected * weights).sum(), params),
    ):
        assert _err(g_loss, g_ce) <= TOL, name


def test_padded_vocabulary() -> None:
    """Padding rows exist in the weights but never in the logits; the loss is over the padded vocabulary (Megatron)."""
    config = _config(make_vocab_size_divisible_by=64)
    assert config.padded_vocab_size == 128
    model = _build(config)
    assert model.embedding.word_embeddings.weight.shape == (128, 64)
    ids, labels = _ids(2, 16), _ids(2, 16, seed=1)
    logits = model(ids)
    assert logits.shape == (2, 16, 100)
    hidden = model.decoder(model.embedding(ids), seq_idx=None, position_ids=None)
    padded_logits = F.linear(hidden, model.output_weight).transpose(0, 1)  # [b, s, 128]
    assert _err(logits, padded_logits[..., :100]) <= TOL
    expected = F.cross_entropy(padded_logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 16)
    assert _err(model(ids, labels=labels), expected) <= TOL


def test_tied_and_untied_embeddings() -> None:
    tied = _build(_config())
    untied = _build(_config(untie_embeddings_and_output_weights=True))
    embedding_key, output_key = "embedding.word_embeddings.weight", "output_layer.weight"
    assert tied.output_layer is None and tied.output_weight is tied.embedding.word_embeddings.weight
    assert output_key not in tied.state_dict()
    assert untied.output_weight is untied.output_layer.weight
    assert not torch.equal(untied.state_dict()[output_key], untied.state_dict()[embedding_key])
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 100 * 64

    # An untied model whose output layer holds the embedding computes the tied model, and the tied gradient is the
    # sum of the untied model's two gradients (lookup + output projection).
    state = tied.state_dict()
    untied.load_state_dict({**state, output_key: state[embedding_key].clone()})
    ids, labels = _ids(2, 16), _ids(2, 16, seed=1)
    loss_tied, loss_untied = tied(ids, labels=labels), untied(ids, labels=labels)
    assert _err(loss_untied, loss_tied) <= TOL
    loss_tied.sum().backward()
    loss_untied.sum().backward()
    summed = untied.embedding.word_embeddings.weight.grad + untied.output_layer.weight.grad
    assert _err(tied.embedding.word_embeddings.weight.grad, summed) <= TOL
    # The untied output layer really is independent: changing it changes the logits but not the embedding.
    with torch.no_grad():
        untied.output_layer.weight.mul_(2.0)
        assert _err(untied(ids), 2.0 * tied(ids)) <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline stages.


def _stage_models(config: HybridConfig, ranges: list[tuple[int, int]], full_state: dict) -> list[MambaModel]:
    """Build one model per stage (each from a different seed) and fill it from the full state dict by name."""
    stages = []
    for index, layer_range in enumerate(ranges):
        stage = _build(
            config,
            seed=100 + index,
            pre_process=index == 0,
            post_process=index == len(ranges) - 1,
            layer_range=layer_range,
        )
        names = stage.state_dict().keys()
        source = dict(full_state)
        if "output_layer.weight" in names and "output_layer.weight" not in full_state:
            # Tied embeddings on a last stage without the embedding: its copy of the output weight starts equal to
            # the embedding (the pipeline keeps them equal by summing their gradients).
            source["output_layer.weight"] = full_state["embedding.word_embeddings.weight"]
        stage.load_state_dict({k: source[k] for k in names}, strict=True)
        stages.append(stage)
    return stages


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 3), (3, 6)],
        [(s.layer_offset, s.layer_offset + s.num_layers) for [s] in split_pattern_for_pipeline("M*-M-*", 3)],
        [(0, 1), (1, 5), (5, 6)],
    ],
    ids=["2_stages", "3_even_stages", "3_uneven_stages"],
)
@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_pipeline_stages_chain_to_the_full_model(ranges: list[tuple[int, int]], untied: bool) -> None:
    config = _config(untie_embeddings_and_output_weights=untied)
    full = _build(config)
    full_state = full.state_dict()
    stages = _stage_models(config, ranges, full_state)

    # Layers are keyed by their global index, so every stage's names are the full model's names.
    stage_keys = [set(stage.state_dict()) for stage in stages]
    assert set().union(*stage_keys) - {"output_layer.weight"} == set(full_state) - {"output_layer.weight"}
    for stage, (start, end) in zip(stages, ranges):
        assert list(stage.decoder.layers.keys()) == [str(i) for i in range(start, end)]

    ids, labels = _ids(2, 24), _ids(2, 24, seed=1)
    seq_idx = _seq_idx([[10, 14], [24]])
    weights = torch.rand(2, 24, generator=torch.Generator().manual_seed(2))
    expected_loss = full(ids, labels=labels, seq_idx=seq_idx)
    (expected_loss * weights).sum().backward()
    with torch.no_grad():
        expected_logits = full(ids, seq_idx=seq_idx)

    # Forward stage by stage; backward in reverse, handing each stage the gradient of its output (a pipeline schedule).
    boundaries = []
    hidden = None
    for index, stage in enumerate(stages):
        if index == 0:
            out = stage(ids, seq_idx=seq_idx, labels=labels if len(stages) == 1 else None)
        elif index < len(stages) - 1:
            out = stage(hidden_states=hidden, seq_idx=seq_idx)
        else:
            out = stage(hidden_states=hidden, seq_idx=seq_idx, labels=labels)
        if index < len(stages) - 1:
            assert out.shape == (24, 2, 64)  # [s, b, h] between stages
            boundaries.append(out)
            hidden = out.detach().requires_grad_()
            boundaries.append(hidden)
    loss = out
    assert _err(loss, expected_loss) <= TOL
    (loss * weights).sum().backward()
    for sent, received in reversed(list(zip(boundaries[0::2], boundaries[1::2]))):
        sent.backward(received.grad)

    full_grads = {name: p.grad for name, p in full.named_parameters()}
    for index, stage in enumerate(stages):
        for name, param in stage.named_parameters():
            if name in ("output_layer.weight", "embedding.word_embeddings.weight") and not untied:
                # Tied: the first stage's embedding gets the lookup part, the last stage's copy the output projection
                # part; their sum is checked below.
                continue
            assert _err(param.grad, full_grads[name]) <= TOL, f"stage {index}: gradient of {name}"
    if not untied:
        embedding_grad = stages[0].embedding.word_embeddings.weight.grad + stages[-1].output_layer.weight.grad
        assert _err(embedding_grad, full_grads["embedding.word_embeddings.weight"]) <= TOL

    with torch.no_grad():
        hidden = stages[0](ids, seq_idx=seq_idx)
        for stage in stages[1:]:
            hidden = stage(hidden_states=hidden, seq_idx=seq_idx)
    assert _err(hidden, expected_logits) <= TOL


def test_pipeline_stage_argument_errors() -> None:
    config = _config()
    middle = _build(config, pre_process=False, post_process=False, layer_range=(2, 4))
    assert middle.embedding is None and middle.output_layer is None and middle.decoder.final_norm is None
    with pytest.raises(ValueError, match="hidden_states"):
        middle(_ids(1, 8))
    with pytest.raises(ValueError, match="input_ids"):
        _build(config, post_process=False, layer_range=(0, 2))(hidden_states=torch.zeros(8, 1, 64))
    with pytest.raises(ValueError, match="layer_range"):
        _build(config, layer_range=(4, 4))


# ---------------------------------------------------------------------------------------------------------------------
# Module specs.


class RecordingMLP(MLP):
    """The default MLP that counts its calls."""

    calls = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(hidden_states)


class ZeroMLP(nn.Module):
    """An MLP slot filler without parameters that contributes nothing to the residual stream."""

    def __init__(self, config: HybridConfig, groups: object, submodules: object = None, layer_number: int = 0) -> None:
        super().__init__()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class ExplicitSoftmaxAttention(nn.Module):
    """Core attention written out (scores, mask, softmax, weighted sum) instead of scaled_dot_product_attention."""

    calls = 0

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        type(self).calls += 1
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        seqlen = q.shape[2]
        if seq_idx is None:
            mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        else:
            mask = document_causal_mask(seq_idx)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def _spec_with(mlp: object = None, core_attention: object = None) -> ModuleSpec:
    """``local_stack_spec`` with the MLP module and/or the core attention replaced."""
    stack = local_stack_spec.submodules
    attention_layer, mlp_layer = stack.attention_layer, stack.mlp_layer
    if core_attention is not None:
        self_attention = attention_layer.submodules.self_attention
        self_attention = dataclasses.replace(
            self_attention, submodules=dataclasses.replace(self_attention.submodules, core_attention=core_attention)
        )
        attention_layer = dataclasses.replace(
            attention_layer, submodules=dataclasses.replace(attention_layer.submodules, self_attention=self_attention)
        )
    if mlp is not None:
        mlp_spec = dataclasses.replace(mlp_layer.submodules.mlp, module=mlp)
        mlp_layer = dataclasses.replace(mlp_layer, submodules=dataclasses.replace(mlp_layer.submodules, mlp=mlp_spec))
    return dataclasses.replace(
        local_stack_spec,
        submodules=dataclasses.replace(stack, attention_layer=attention_layer, mlp_layer=mlp_layer),
    )


def test_spec_swap_changes_the_built_modules() -> None:
    config = _config()
    default = _build(config)
    custom = _build(config, stack_spec=_spec_with(mlp=RecordingMLP, core_attention=ExplicitSoftmaxAttention))
    for index, symbol in enumerate(config.layer_pattern):
        layer_default, layer_custom = default.decoder.layers[str(index)], custom.decoder.layers[str(index)]
        assert type(layer_default) is type(layer_custom)
        if symbol == "-":
            assert type(layer_default.mlp) is MLP and type(layer_custom.mlp) is RecordingMLP
        if symbol == "*":
            assert isinstance(layer_custom.self_attention, SelfAttention)
            assert type(layer_default.self_attention.core_attention) is SDPAttention
            assert type(layer_custom.self_attention.core_attention) is ExplicitSoftmaxAttention
    # Parameter-free swaps leave the weights (and the RNG stream that drew them) unchanged.
    state_default, state_custom = default.state_dict(), custom.state_dict()
    assert state_default.keys() == state_custom.keys()
    assert all(torch.equal(state_default[k], state_custom[k]) for k in state_default)

    ids, seq_idx = _ids(2, 24), _seq_idx([[10, 14], [24]])
    RecordingMLP.calls = ExplicitSoftmaxAttention.calls = 0
    with torch.no_grad():
        for kwargs in ({}, {"seq_idx": seq_idx}):
            assert _err(custom(ids, **kwargs), default(ids, **kwargs)) <= TOL
    assert RecordingMLP.calls == 2 * config.layer_pattern.count("-")
    assert ExplicitSoftmaxAttention.calls == 2 * config.layer_pattern.count("*")

    zero = _build(config, stack_spec=_spec_with(mlp=ZeroMLP))
    assert not any(".mlp." in name for name in zero.state_dict())
    zero.load_state_dict({k: v for k, v in state_default.items() if ".mlp." not in k})
    with torch.no_grad():
        assert _err(zero(ids), default(ids)) > 1e-3
        # ...and equals the default model with its MLP output projections zeroed.
        for name, param in default.named_parameters():
            if name.endswith("mlp.linear_fc2.weight"):
                param.zero_()
        assert _err(zero(ids), default(ids)) <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts.


def _meta_count(config: HybridConfig) -> tuple[int, dict[str, int]]:
    """Total parameters of a meta-device instantiation and the per-layer-type sums."""
    with torch.device("meta"):
        model = MambaModel(config)
    assert all(p.is_meta for p in model.parameters())
    per_type = {"mamba": 0, "attention": 0, "mlp": 0}
    kinds = {MambaLayer: "mamba", AttentionLayer: "attention", MLPLayer: "mlp"}
    for layer in model.decoder.layers.values():
        per_type[kinds[type(layer)]] += sum(p.numel() for p in layer.parameters())
    return sum(p.numel() for p in model.parameters()), per_type


# Megatron-LM examples/mamba/train.sh, written out by hand (independently of models/param_count.py): V = 256000,
# ffn = 4h, Mamba state 128 / head dim 64 / 8 groups / expand 2 / conv 4, GQA with 8 query groups, untied, no biases.
def _train_sh_closed_form(layers: dict[str, int], h: int, heads: int) -> int:
    V, d, GN, e = 256000, 2 * h, 8 * 128, h // heads
    H = d // 64
    mamba = h + h * (2 * d + 2 * GN + H) + 5 * (d + 2 * GN) + 3 * H + d + d * h
    attention = h + h * (heads + 16) * e + heads * e * h
    mlp = h + 4 * h * h + 4 * h * h
    return 2 * V * h + h + layers["M"] * mamba + layers["*"] * attention + layers["-"] * mlp


@pytest.mark.parametrize(
    "name, layers, hidden, heads, expected_total",
    [
        ("800M", {"M": 20, "*": 4, "-": 24}, 1024, 16, 907_127_680),
        ("8B", {"M": 24, "*": 4, "-": 28}, 4096, 32, 8_654_517_248),
    ],
)
def test_named_preset_parameter_counts(name: str, layers: dict, hidden: int, heads: int, expected_total: int) -> None:
    config = PRESETS[name]()
    assert config.padded_vocab_size == NEMOTRON_SENTENCEPIECE_VOCAB
    assert {s: config.layer_pattern.count(s) for s in "M*-"} == layers
    total, per_type = _meta_count(config)
    formula = parameter_count_formula(config)
    print(
        f"\n{name}: {total:,} parameters ({total / 1e9:.3f} B), embedding {formula['embedding']:,}, "
        f"output layer {formula['output_layer']:,}, non-embedding {formula['non_embedding']:,}; "
        f"pattern {config.layer_pattern}"
    )
    assert total == formula["total"] == count_parameters(config)["total"] == expected_total
    assert total == _train_sh_closed_form(layers, hidden, heads)
    assert per_type == {k: formula[k] for k in per_type}


def _random_config(rng: random.Random) -> HybridConfig:
    tp = rng.choice([1, 2, 4])  # divisibility as a TP run would need it, to vary the shapes realistically
    num_layers = rng.randint(1, 9)
    heads_per_group = rng.choice([1, 2, 4])
    query_groups = tp * rng.randint(1, 3)
    mamba_groups = tp * rng.randint(1, 2)
    common = dict(
        num_layers=num_layers,
        hidden_size=8 * rng.randint(2, 12),
        vocab_size=rng.randint(10, 300),
        make_vocab_size_divisible_by=rng.choice([1, 8, 128]),
        num_attention_heads=query_groups * heads_per_group,
        num_query_groups=query_groups,
        kv_channels=rng.choice([4, 8, 12]),
        ffn_hidden_size=tp * rng.randint(1, 40),
        activation=rng.choice(["squared_relu", "swiglu", "gelu"]),
        add_bias_linear=rng.random() < 0.5,
        mamba_num_groups=mamba_groups,
        mamba_num_heads=mamba_groups * rng.randint(1, 3),
        mamba_head_dim=rng.choice([4, 8, 16]),
        mamba_state_dim=rng.choice([4, 8, 16]),
        mamba_conv_kernel=rng.randint(2, 4),
        mamba_conv_bias=rng.random() < 0.7,
        untie_embeddings_and_output_weights=rng.random() < 0.5,
    )
    if rng.random() < 0.5:
        pattern = "".join(rng.choice("M*-") for _ in range(num_layers))
        return HybridConfig(**common, hybrid_override_pattern=pattern)
    attention = rng.choice([0.0, 0.1, 0.25, 0.5])
    return HybridConfig(**common, hybrid_attention_ratio=attention, hybrid_mlp_ratio=rng.choice([0.0, 0.25, 0.5]))


def test_parameter_count_formula_matches_meta_instantiation_for_random_configs() -> None:
    rng = random.Random(2024)
    for trial in range(60):
        config = _random_config(rng)
        total, per_type = _meta_count(config)
        formula = parameter_count_formula(config)
        context = f"trial {trial}: {config}"
        assert formula["total"] == total, context
        assert {k: formula[k] for k in per_type} == per_type, context
        counts = {s: config.layer_pattern.count(s) for s in "M*-"}
        assert formula["mamba"] == counts["M"] * mamba_layer_parameters(config), context
        assert formula["attention"] == counts["*"] * attention_layer_parameters(config), context
        assert formula["mlp"] == counts["-"] * mlp_layer_parameters(config), context
        reference = count_parameters(config)
        assert {k: formula[k] for k in reference} == reference, context


def test_presets() -> None:
    assert set(PRESETS) == {"tiny", "cpu-bench", "800M", "8B"}
    for name, factory in PRESETS.items():
        first = factory()
        first.hidden_size = -1  # configs are mutable: every call must hand out a fresh one
        assert factory().hidden_size > 0, name
        assert parameter_count_formula(factory())["total"] == _meta_count(factory())[0], name
    tiny = get_preset("tiny")
    assert tiny.layer_pattern == "MM*-M*M-"
    assert (tiny.hidden_size, tiny.vocab_size, tiny.num_query_groups, tiny.mamba_num_heads) == (256, 8192, 4, 8)
    bench = get_preset("cpu-bench")
    assert bench.layer_pattern == "M-*-M-M-*-M-"
    assert (bench.kv_channels, bench.mamba_d_inner, bench.activation) == (32, 512, "squared_relu")
    assert bench.untie_embeddings_and_output_weights and not tiny.untie_embeddings_and_output_weights
    assert get_preset("tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("70B")
    # The tiny preset really runs.
    model = _build(get_preset("tiny", vocab_size=50)).eval()
    with torch.no_grad():
        assert model(_ids(1, 16, vocab=50)).shape == (1, 16, 50)


# ---------------------------------------------------------------------------------------------------------------------
# residual_in_fp32.


def test_residual_in_fp32_with_bf16_layers() -> None:
    """bf16 parameters and mixers, float32 residual stream: every layer hands float32 to the next one."""
    config = _config(params_dtype=torch.bfloat16, residual_in_fp32=True)
    model = _build(config)
    layer_outputs, mixer_inputs = [], []
    hooks = []
    for layer in model.decoder.layers.values():
        hooks.append(layer.register_forward_hook(lambda module, args, output: layer_outputs.append(output)))
        inner = getattr(layer, "mixer", None) or getattr(layer, "self_attention", None) or layer.mlp
        hooks.append(inner.register_forward_pre_hook(lambda module, args: mixer_inputs.append(args[0])))
    ids, labels = _ids(2, 16), _ids(2, 16, seed=1)
    logits = model(ids, seq_idx=_seq_idx([[7, 9], [16]]))
    for hook in hooks:
        hook.remove()

    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(layer_outputs) == len(mixer_inputs) == config.num_layers
    assert all(out.dtype == torch.float32 for out in layer_outputs)
    assert all(x.dtype == torch.bfloat16 for x in mixer_inputs)
    # A genuinely float32 stream: it holds values that bf16 cannot represent.
    assert all((out.to(torch.bfloat16).float() != out).any() for out in layer_outputs)
    assert logits.dtype == torch.bfloat16

    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())

    # A middle pipeline stage hands the float32 stream on; without residual_in_fp32 the stream is bf16.
    middle = _build(config, pre_process=False, post_process=False, layer_range=(1, 4))
    assert middle(hidden_states=torch.randn(16, 2, 64, dtype=torch.bfloat16)).dtype == torch.float32
    plain = _build(_config(params_dtype=torch.bfloat16))
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o)) for layer in plain.decoder.layers.values()]
    plain(ids)
    assert all(out.dtype == torch.bfloat16 for out in outputs)

    # Sanity of the values: close to the float32 model with the same weights.
    reference = _build(_config())
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert _err(logits.float(), reference(ids, seq_idx=_seq_idx([[7, 9], [16]]))) < 5e-2


def test_bf16_autocast_training_step_on_cpu() -> None:
    """bf16 autocast (how training runs with --bf16) works through every layer type and stays near float32."""
    model = _build(_config())
    ids, labels = _ids(2, 40), _ids(2, 40, seed=1)
    reference = model(ids, labels=labels).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=labels).mean()
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 2e-2 * abs(reference.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_model_converted_to_bfloat16_after_building_runs_in_bfloat16(residual_in_fp32: bool) -> None:
    """``model.to(torch.bfloat16)`` after building a float32 model (the usual inference recipe): the stack must read
    the parameters' dtype, not the config's float32, or the output layer sees float32 activations."""
    config = HybridConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                          vocab_size=48, hybrid_override_pattern="M*-M", mamba_state_dim=8, mamba_head_dim=8,
                          mamba_num_groups=2, mamba_chunk_size=8, residual_in_fp32=residual_in_fp32)
    torch.manual_seed(0)
    model = MambaModel(config)
    ids = torch.randint(0, 48, (2, 11))
    with torch.no_grad():
        reference = model(ids)
        logits = model.to(torch.bfloat16)(ids)
    assert logits.dtype == torch.bfloat16
    assert ((logits.float() - reference).norm() / reference.norm()).item() < 5e-2
