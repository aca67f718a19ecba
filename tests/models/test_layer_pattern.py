"""Tests of the layer-pattern planner against megatron-core 0.16 (installed in the venv) and its own rules.

megatron-core is the reference for the ratio allocation, the override checks and the pipeline split without ``|``
(``MambaStack._select_layers_for_pipeline_parallel``); the ``|`` split follows Megatron-LM's hybrid models
(segment ``v * pp + r`` on rank ``r``, chunk ``v``), which the installed version predates, so it is checked by hand.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import pytest

from megatron_hybrid.models.layer_pattern import (
    LAYER_SYMBOLS,
    StageSlice,
    allocate_layers,
    pipeline_stage_count,
    split_pattern_for_pipeline,
    strip_pipeline_separators,
)

# ---------------------------------------------------------------------------------------------------------------------
# Reference implementation (megatron-core), imported quietly.


def _import_quietly(name: str) -> ModuleType:
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    # megatron-core logs every allocation at INFO; keep test output clean.
    logging.getLogger(module.__name__).disabled = True
    return module


@pytest.fixture(scope="module")
def mcore_allocation() -> ModuleType:
    return _import_quietly("megatron.core.ssm.mamba_hybrid_layer_allocation")


@pytest.fixture(scope="module")
def mcore_allocate(mcore_allocation: ModuleType) -> Callable[..., str]:
    def run(*args: object) -> str:
        return "".join(mcore_allocation.allocate_layers(*args))

    return run


@pytest.fixture(scope="module")
def mcore_select_layers() -> Callable[..., tuple[int, str]]:
    """megatron-core's no-interleaving pipeline split of a hybrid stack, called on a stand-in ``MambaStack``."""
    mamba_block = _import_quietly("megatron.core.ssm.mamba_block")

    class _Group:
        def __init__(self, rank: int, size: int) -> None:
            self._rank, self._size = rank, size

        def rank(self) -> int:
            return self._rank

        def size(self) -> int:
            return self._size

    def run(pattern: str, pp: int, rank: int, first: int | None = None, last: int | None = None) -> tuple[int, str]:
        config = SimpleNamespace(
            virtual_pipeline_model_parallel_size=None,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
            num_layers=len(pattern),
        )
        stack = SimpleNamespace(pp_group=_Group(rank, pp), config=config)
        offset, layers = mamba_block.MambaStack._select_layers_for_pipeline_parallel(stack, list(pattern))
        return offset, "".join(layers)

    return run


def _outcome(fn: Callable[..., str], *args: object) -> tuple[str, str]:
    """('ok', result) or ('error', '') so that two implementations can be compared on accept/reject."""
    try:
        return "ok", fn(*args)
    except (ValueError, AssertionError):
        return "error", ""


# ---------------------------------------------------------------------------------------------------------------------
# Generated inputs (deterministic).

_SPECIAL_RATIOS = (0.0, 1.0, 0.5, 0.25, 0.125, 0.1, 0.08, 0.05, 1 / 3, 2 / 3, 0.3, 0.7, 0.75, 0.9, 0.2, 0.4, 0.6)
_EDGE_LAYERS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 48, 52, 56, 64, 127, 128)


def _random_ratio(rng: random.Random) -> float:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(_SPECIAL_RATIOS)
    if kind == 1:
        return round(rng.random(), 2)
    if kind == 2:
        return rng.random()
    return rng.random() * 0.2  # sparse attention / MLP, the common real-world regime


def _generate_cases() -> list[tuple[int, float, float]]:
    rng = random.Random(20250611)
    cases: list[tuple[int, float, float]] = []
    for n in range(1, 129):  # every depth 1..128 at least once
        cases.append((n, _random_ratio(rng), _random_ratio(rng)))
    for n in _EDGE_LAYERS:  # the corners: all-Mamba, all-attention, all-MLP, half/half, and sums > 1
        for a, m in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5), (0.6, 0.5), (1.0, 1.0)):
            cases.append((n, a, m))
    for _ in range(480):
        cases.append((rng.randint(1, 128), _random_ratio(rng), _random_ratio(rng)))
    return cases


CASES = _generate_cases()
VALID_CASES = [c for c in CASES if c[1] + c[2] <= 1.0]


def test_enough_generated_cases() -> None:
    assert len(VALID_CASES) >= 500
    assert len(CASES) - len(VALID_CASES) >= 20  # the sum > 1 branch is exercised too


@pytest.mark.parametrize(("n", "attention", "mlp"), CASES, ids=[f"{n}-{a:.4g}-{m:.4g}" for n, a, m in CASES])
def test_allocation_matches_megatron_core(
    mcore_allocate: Callable[..., str], n: int, attention: float, mlp: float
) -> None:
    try:
        expected = mcore_allocate(n, attention, mlp)
    except AssertionError:
        # megatron-core asserts attention + mlp <= 1.0; we raise a ValueError for exactly the same inputs.
        with pytest.raises(ValueError, match=r"must be <= 1"):
            allocate_layers(n, attention, mlp)
        return
    got = allocate_layers(n, attention, mlp)
    assert got == expected
    assert len(got) == n
    assert set(got) <= set(LAYER_SYMBOLS)
    # Attention is always placed exactly as requested; MLP too unless the two rounded counts over-subscribe the stack.
    assert got.count("*") == round(n * attention)
    if round(n * attention) + round(n * mlp) <= n:
        assert got.count("-") == round(n * mlp)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((8, 0.25, 0.25), "MM*-M*M-"),
        ((48, 0.08, 0.5), "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),
        ((4, 0.0, 0.0), "MMMM"),
        ((3, 1.0, 0.0), "***"),
        ((3, 0.0, 1.0), "---"),
        ((3, 0.5, 0.5), "*-*"),  # 2 + 2 rounded layers over-subscribe 3: megatron-core places only one MLP
    ],
)
def test_documented_examples(args: tuple[int, float, float], expected: str) -> None:
    assert allocate_layers(*args) == expected


def test_56_layer_counts() -> None:
    pattern = allocate_layers(56, 0.08, 0.5)
    assert (pattern.count("M"), pattern.count("*"), pattern.count("-")) == (24, 4, 28)


def test_integer_and_numpy_inputs_are_accepted(mcore_allocate: Callable[..., str]) -> None:
    import numpy as np

    assert allocate_layers(4, 1, 0) == "****"
    assert allocate_layers(4, 0, 1) == "----"
    assert allocate_layers(np.int64(48), np.float64(0.08), np.float64(0.5)) == mcore_allocate(48, 0.08, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize("n", [0, -3, 2.0, True, "8", None])
def test_bad_layer_count(n: object) -> None:
    with pytest.raises(ValueError, match=r"total_layers_count must be a positive integer"):
        allocate_layers(n, 0.25, 0.25)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [-0.1, 1.0000001, 2, float("nan"), float("inf"), True, "0.5", None])
@pytest.mark.parametrize("which", ["target_attention_ratio", "target_mlp_ratio"])
def test_bad_ratio(which: str, ratio: object) -> None:
    kwargs = {"target_attention_ratio": 0.0, "target_mlp_ratio": 0.0, which: ratio}
    with pytest.raises(ValueError, match=rf"{which} must be a number in \[0, 1\]"):
        allocate_layers(8, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("attention", "mlp"), [(0.6, 0.5), (1.0, 1.0), (0.1, 0.9000000000000001)])
def test_ratio_sum_above_one(mcore_allocate: Callable[..., str], attention: float, mlp: float) -> None:
    with pytest.raises(ValueError, match=r"target_attention_ratio \+ target_mlp_ratio must be <= 1"):
        allocate_layers(10, attention, mlp)
    with pytest.raises(AssertionError):
        mcore_allocate(10, attention, mlp)


@pytest.mark.parametrize(("attention", "mlp"), [(0.5, 0.5), (0.7, 0.3), (0.1, 0.9), (1 / 3, 2 / 3), (0.35, 0.65)])
def test_ratio_sum_exactly_one_is_accepted(mcore_allocate: Callable[..., str], attention: float, mlp: float) -> None:
    for n in (4, 10, 31):
        pattern = allocate_layers(n, attention, mlp)
        assert pattern == mcore_allocate(n, attention, mlp)
        assert "M" not in pattern


# ---------------------------------------------------------------------------------------------------------------------
# Override patterns.


def test_override_with_zero_ratios_is_verbatim() -> None:
    assert allocate_layers(9, 0.0, 0.0, "M*-M*-M*-") == "M*-M*-M*-"
    assert allocate_layers(9, 0.0, 0.0, "MMMMMMMMM") == "MMMMMMMMM"


def test_override_reordering_same_counts_is_accepted() -> None:
    # Ratios give MM*-M*M-; a different order with the same counts is a deliberate choice (megatron-core only logs).
    assert allocate_layers(8, 0.25, 0.25, "*-MMMM*-") == "*-MMMM*-"


def test_override_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"wrong length: 7 layers .* expected total_layers_count=8"):
        allocate_layers(8, 0.0, 0.0, "MM*-M*M")
    with pytest.raises(ValueError, match=r"wrong length: 0 layers"):
        allocate_layers(8, 0.0, 0.0, "")


def test_override_separators_not_counted_in_length() -> None:
    assert allocate_layers(4, 0.0, 0.0, "MM|MM") == "MM|MM"
    with pytest.raises(ValueError, match=r"wrong length: 4 layers \('\|' separators not counted\)"):
        allocate_layers(5, 0.0, 0.0, "MM|MM")


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("MMX*", r"unknown symbol 'X' at position 2"),
        ("MM m", r"unknown symbol ' ' at position 2"),
        ("MMmM", r"unknown symbol 'm' at position 2"),
        ("MMEM", r"unknown symbol 'E' at position 2 \(MoE layers"),
        ("MM/M", r"unknown symbol '/' at position 2 \(multi-token-prediction"),
    ],
)
def test_override_unknown_symbol(pattern: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        allocate_layers(4, 0.0, 0.0, pattern)


@pytest.mark.parametrize(
    ("n", "attention", "mlp", "pattern"),
    [
        (8, 0.25, 0.25, "MMM-M*M-"),  # one attention short
        (8, 0.25, 0.0, "MM*-M*MM"),  # MLP present although the ratios allocate none
        (8, 0.0, 0.25, "MM*-MMM-"),  # attention present although the ratios allocate none
        (8, 0.25, 0.25, "MM*-|M*M*"),  # separators are ignored when counting
    ],
)
def test_override_contradicting_nonzero_ratios(
    mcore_allocate: Callable[..., str], n: int, attention: float, mlp: float, pattern: str
) -> None:
    with pytest.raises(ValueError, match=r"contradicts the layer counts .* the ratios allocate"):
        allocate_layers(n, attention, mlp, pattern)
    with pytest.raises(ValueError, match=r"must match"):
        mcore_allocate(n, attention, mlp, strip_pipeline_separators(pattern))


@pytest.mark.parametrize("pattern", ["|MMMM", "MMMM|", "MM||MM", "|M|M|M|M|"])
def test_override_empty_pipeline_stage(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"empty pipeline stage"):
        allocate_layers(4, 0.0, 0.0, pattern)


def test_override_keeps_separators_and_config_strips_them() -> None:
    pattern = allocate_layers(8, 0.25, 0.25, "MM*-|M*M-")
    assert pattern == "MM*-|M*M-"
    assert strip_pipeline_separators(pattern) == "MM*-M*M-"
    assert pipeline_stage_count(pattern) == 2


def test_override_checked_even_when_ratio_check_is_off() -> None:
    with pytest.raises(ValueError, match=r"unknown symbol"):
        allocate_layers(4, 0.0, 0.0, "MM?M")
    with pytest.raises(ValueError, match=r"target_mlp_ratio must be"):
        allocate_layers(4, 0.0, 1.5, "MMMM")


def test_override_not_a_string() -> None:
    with pytest.raises(TypeError, match=r"override_pattern must be a string"):
        allocate_layers(4, 0.0, 0.0, ["M", "M", "M", "M"])  # type: ignore[arg-type]


def _override_cases() -> list[tuple[int, float, float, str]]:
    """Overrides on generated allocations: shuffles (same counts), single-symbol edits, wrong lengths, free patterns."""
    rng = random.Random(7)
    cases: list[tuple[int, float, float, str]] = []
    for n, attention, mlp in rng.sample(VALID_CASES, 60):
        auto = allocate_layers(n, attention, mlp)
        shuffled = list(auto)
        rng.shuffle(shuffled)
        cases.append((n, attention, mlp, "".join(shuffled)))
        edited = list(auto)
        edited[rng.randrange(n)] = rng.choice(LAYER_SYMBOLS)
        cases.append((n, attention, mlp, "".join(edited)))
        cases.append((n, attention, mlp, auto + "M"))
        cases.append((n, attention, mlp, auto[:-1]))
        free = "".join(rng.choice(LAYER_SYMBOLS) for _ in range(n))
        cases.append((n, 0.0, 0.0, free))
        cases.append((n, attention, mlp, free))
        cases.append((n, attention, mlp, auto[:-1] + "X"))
    return cases


OVERRIDE_CASES = _override_cases()


@pytest.mark.parametrize(
    ("n", "attention", "mlp", "pattern"), OVERRIDE_CASES, ids=[f"{i}" for i in range(len(OVERRIDE_CASES))]
)
def test_override_behaviour_matches_megatron_core(
    mcore_allocate: Callable[..., str], n: int, attention: float, mlp: float, pattern: str
) -> None:
    assert _outcome(allocate_layers, n, attention, mlp, pattern) == _outcome(mcore_allocate, n, attention, mlp, pattern)


def test_documented_divergences_from_megatron_core(mcore_allocate: Callable[..., str]) -> None:
    # '|' is a pipeline separator here (as in newer Megatron-LM); megatron-core 0.16 rejects it.
    assert allocate_layers(4, 0.0, 0.0, "MM|MM") == "MM|MM"
    assert _outcome(mcore_allocate, 4, 0.0, 0.0, "MM|MM")[0] == "error"
    # MoE layers exist in megatron-core but not in this framework.
    assert mcore_allocate(4, 0.0, 0.0, "MMEM") == "MMEM"
    with pytest.raises(ValueError, match=r"MoE"):
        allocate_layers(4, 0.0, 0.0, "MMEM")


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline splitting.


def _check_partition(pattern: str, pp: int, vs: int, plan: list[list[StageSlice]]) -> None:
    layers = strip_pipeline_separators(pattern)
    assert len(plan) == pp
    assert all(len(chunks) == vs for chunks in plan)
    stages = sorted((s for chunks in plan for s in chunks), key=lambda s: s.stage_index)
    assert [s.stage_index for s in stages] == list(range(pp * vs))
    offset = 0
    for stage in stages:
        assert stage.stage_index == stage.virtual_stage * pp + stage.pipeline_rank
        assert stage.layer_offset == offset
        assert stage.num_layers > 0
        assert layers[stage.layer_slice] == stage.symbols
        assert list(stage.layer_indices) == list(range(offset, offset + stage.num_layers))
        offset += stage.num_layers
    assert offset == len(layers)
    assert "".join(s.symbols for s in stages) == layers
    for rank, chunks in enumerate(plan):
        for chunk, stage in enumerate(chunks):
            assert (stage.pipeline_rank, stage.virtual_stage) == (rank, chunk)


def test_even_split() -> None:
    plan = split_pattern_for_pipeline("MM*-M*M-", 2)
    assert [[(s.symbols, s.layer_offset) for s in chunks] for chunks in plan] == [[("MM*-", 0)], [("M*M-", 4)]]


def test_single_stage() -> None:
    plan = split_pattern_for_pipeline("MM*-M*M-", 1)
    assert plan == [[StageSlice(0, 0, 0, 0, "MM*-M*M-")]]


def test_even_split_interleaved() -> None:
    pattern = allocate_layers(16, 0.25, 0.25)
    plan = split_pattern_for_pipeline(pattern, 4, 2)
    for rank in range(4):
        for chunk in range(2):
            stage = plan[rank][chunk]
            assert stage.layer_offset == (chunk * 4 + rank) * 2
            assert stage.symbols == pattern[stage.layer_offset : stage.layer_offset + 2]
    _check_partition(pattern, 4, 2, plan)


def test_separator_split_interleaved() -> None:
    pattern = "MM*|-M*|M-|M"
    plan = split_pattern_for_pipeline(pattern, 2, 2)
    assert [[(s.symbols, s.layer_offset, s.stage_index) for s in chunks] for chunks in plan] == [
        [("MM*", 0, 0), ("M-", 6, 2)],
        [("-M*", 3, 1), ("M", 8, 3)],
    ]
    _check_partition(pattern, 2, 2, plan)


def test_separator_split_uneven_stage_sizes() -> None:
    pattern = "M|M*-M*M-M|M"
    plan = split_pattern_for_pipeline(pattern, 3)
    assert [chunks[0].symbols for chunks in plan] == ["M", "M*-M*M-M", "M"]
    assert [chunks[0].layer_offset for chunks in plan] == [0, 1, 9]


def test_separators_define_virtual_stages_on_one_rank() -> None:
    plan = split_pattern_for_pipeline("MM|**|--", 1, 3)
    assert [s.symbols for s in plan[0]] == ["MM", "**", "--"]


def _split_cases() -> list[tuple[str, int, int]]:
    rng = random.Random(3)
    cases = []
    for _ in range(60):
        pp, vs = rng.randint(1, 4), rng.randint(1, 3)
        stages = pp * vs
        sizes = [rng.randint(1, 5) for _ in range(stages)]
        body = allocate_layers(sum(sizes), round(rng.random() * 0.3, 2), round(rng.random() * 0.5, 2))
        if rng.random() < 0.5:
            pieces, start = [], 0
            for size in sizes:
                pieces.append(body[start : start + size])
                start += size
            cases.append(("|".join(pieces), pp, vs))
        else:
            per_stage = rng.randint(1, 4)
            cases.append((allocate_layers(stages * per_stage, 0.1, 0.3), pp, vs))
    return cases


@pytest.mark.parametrize(("pattern", "pp", "vs"), _split_cases())
def test_split_partitions_the_stack(pattern: str, pp: int, vs: int) -> None:
    _check_partition(pattern, pp, vs, split_pattern_for_pipeline(pattern, pp, vs))


@pytest.mark.parametrize(
    ("n", "pp", "first", "last"),
    [
        (16, 4, None, None),
        (8, 2, None, None),
        (10, 4, 1, 3),
        (10, 3, 2, None),
        (9, 4, None, 3),
        (8, 2, 3, 5),
        (7, 2, 3, None),
        (12, 1, None, None),
        (48, 8, None, None),
    ],
)
def test_split_without_separators_matches_megatron_core(
    mcore_select_layers: Callable[..., tuple[int, str]], n: int, pp: int, first: int | None, last: int | None
) -> None:
    pattern = allocate_layers(n, 0.25, 0.25)
    plan = split_pattern_for_pipeline(pattern, pp, first_stage_layers=first, last_stage_layers=last)
    _check_partition(pattern, pp, 1, plan)
    for rank in range(pp):
        assert (plan[rank][0].layer_offset, plan[rank][0].symbols) == mcore_select_layers(
            pattern, pp, rank, first, last
        )


def test_uneven_split_that_megatron_core_would_truncate(mcore_select_layers: Callable[..., tuple[int, str]]) -> None:
    # megatron-core 0.16's MambaStack silently drops layers 3..4 here; we refuse.
    pattern = "MM*-M*M-"
    selected = [mcore_select_layers(pattern, 2, rank, 3, 3) for rank in range(2)]
    assert selected == [(0, "MM*"), (5, "*M-")]  # layers 3 and 4 belong to no stage
    with pytest.raises(ValueError, match=r"must equal the 8 layers"):
        split_pattern_for_pipeline(pattern, 2, first_stage_layers=3, last_stage_layers=3)


@pytest.mark.parametrize(
    ("pattern", "pp", "vs", "kwargs", "match"),
    [
        ("MM|MM|MM", 2, 1, {}, r"2 '\|' separators, i.e. 3 pipeline stages, but pipeline_size=2 x .* needs 2 stages"),
        ("MM|MM", 2, 2, {}, r"1 '\|' separators, i.e. 2 pipeline stages, .* needs 4 stages"),
        ("MM||MM", 3, 1, {}, r"empty pipeline stage \(segment 1 of 3"),
        ("|MM", 2, 1, {}, r"empty pipeline stage \(segment 0"),
        ("MM|", 2, 1, {}, r"empty pipeline stage \(segment 1"),
        ("MMMMMMM", 2, 1, {}, r"cannot split 7 layers evenly over pipeline_size=2 x virtual_stages=1 = 2 stages"),
        ("MMMMMMMM", 2, 3, {}, r"cannot split 8 layers evenly .* = 6 stages"),
        ("MMMM", 8, 1, {}, r"cannot split 4 layers evenly"),
        ("", 1, 1, {}, r"has no layers"),
        ("|", 2, 1, {}, r"has no layers"),
        ("MMXM", 2, 1, {}, r"unknown symbol 'X' at position 2"),
        ("MMMM", 0, 1, {}, r"pipeline_size must be a positive integer"),
        ("MMMM", 2, 0, {}, r"virtual_stages must be a positive integer"),
        ("MM|MM", 2, 1, {"first_stage_layers": 2}, r"separators already define the pipeline layout"),
        ("M" * 8, 2, 2, {"first_stage_layers": 2}, r"cannot be combined with virtual_stages > 1"),
        ("M" * 8, 1, 1, {"last_stage_layers": 8}, r"need pipeline_size >= 2"),
        ("M" * 8, 2, 1, {"first_stage_layers": 0}, r"first_stage_layers must be a positive integer"),
        ("M" * 8, 4, 1, {"first_stage_layers": 3, "last_stage_layers": 2}, r"cannot be split evenly and non-empty"),
        ("M" * 8, 4, 1, {"first_stage_layers": 1}, r"the 7 layers left .* over the 3 remaining"),
        ("M" * 8, 3, 1, {"first_stage_layers": 4, "last_stage_layers": 4}, r"the 0 layers left"),
    ],
)
def test_split_errors(pattern: str, pp: int, vs: int, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_pattern_for_pipeline(pattern, pp, vs, **kwargs)


def test_split_rejects_non_string() -> None:
    with pytest.raises(TypeError, match=r"pattern must be a string"):
        split_pattern_for_pipeline(["M", "M"], 1)  # type: ignore[arg-type]


def test_allocated_override_feeds_the_split() -> None:
    pattern = allocate_layers(56, 0.08, 0.5)
    explicit = "|".join(pattern[i : i + 14] for i in range(0, 56, 14))
    assert allocate_layers(56, 0.08, 0.5, explicit) == explicit
    assert split_pattern_for_pipeline(explicit, 2, 2) == split_pattern_for_pipeline(pattern, 2, 2)


def test_strip_and_count_helpers() -> None:
    assert strip_pipeline_separators("M*|-M|M") == "M*-MM"
    assert strip_pipeline_separators("MMM") == "MMM"
    assert pipeline_stage_count("MMM") == 1
    assert pipeline_stage_count("M|M|M") == 3


def test_config_layer_pattern_uses_the_planner() -> None:
    from megatron_hybrid.config import HybridConfig

    base = {"num_layers": 8, "hidden_size": 64, "vocab_size": 100, "mamba_num_groups": 1}
    config = HybridConfig(**base, hybrid_attention_ratio=0.25, hybrid_mlp_ratio=0.25)
    assert config.layer_pattern == "MM*-M*M-"
    config = HybridConfig(**base, hybrid_override_pattern="MM*-|M*M-")
    assert config.layer_pattern == "MM*-M*M-"
