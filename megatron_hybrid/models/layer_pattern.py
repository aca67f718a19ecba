"""Layer-pattern planner: which layer type sits at every depth of a hybrid stack, and which pipeline stage owns it.

A hybrid stack is described by a string with one symbol per layer:

* ``M`` - Mamba-2 mixer layer,
* ``*`` - self-attention layer,
* ``-`` - MLP layer,
* ``|`` - not a layer: a pipeline-stage boundary (only in user-written override patterns).

The pattern either comes from two ratios (``allocate_layers``, bit-for-bit the allocation of megatron-core's
``megatron.core.ssm.mamba_hybrid_layer_allocation.allocate_layers`` so that checkpoints and configs are interchangeable
with Megatron) or verbatim from an override string. ``split_pattern_for_pipeline`` then assigns contiguous slices of
the stack to pipeline ranks and virtual (interleaved) stages with the same meaning Megatron-LM gives to ``|``: the
pattern's segments are the model's stages in execution order, and model chunk ``v`` of pipeline rank ``r`` holds stage
``v * pipeline_size + r``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

MAMBA = "M"
ATTENTION = "*"
MLP = "-"
PIPELINE_SEPARATOR = "|"
LAYER_SYMBOLS: tuple[str, ...] = (MAMBA, ATTENTION, MLP)

_SYMBOL_NAMES = {MAMBA: "Mamba-2", ATTENTION: "attention", MLP: "MLP"}
# Symbols that other Megatron versions understand but this framework deliberately does not build.
_UNSUPPORTED_HINTS = {
    "E": "MoE layers ('E') are not supported by megatron_hybrid",
    "/": "multi-token-prediction patterns ('/') are not supported by megatron_hybrid",
}


def strip_pipeline_separators(pattern: str) -> str:
    """Return ``pattern`` without its ``|`` pipeline-stage separators (the layer symbols only, in order).

    Global layer indices always refer to this stripped string, so it is what model construction should iterate over.
    """
    return pattern.replace(PIPELINE_SEPARATOR, "")


def _describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[s]} '{s}' ({_SYMBOL_NAMES[s]})" for s in LAYER_SYMBOLS)


def _symbol_counts(layers: str) -> dict[str, int]:
    return {s: layers.count(s) for s in LAYER_SYMBOLS}


def _check_symbols(pattern: str, what: str) -> None:
    """Raise a ValueError naming the first character of ``pattern`` that is neither a layer symbol nor ``|``."""
    for position, char in enumerate(pattern):
        if char in LAYER_SYMBOLS or char == PIPELINE_SEPARATOR:
            continue
        hint = _UNSUPPORTED_HINTS.get(char)
        raise ValueError(
            f"{what} {pattern!r} has unknown symbol {char!r} at position {position}"
            + (f" ({hint})" if hint else "")
            + "; valid symbols are 'M' (Mamba-2), '*' (attention), '-' (MLP) and '|' (pipeline-stage separator)"
        )


def _check_no_empty_segments(pattern: str, what: str) -> list[str]:
    """Split ``pattern`` at ``|`` and reject empty segments: a pipeline stage without layers cannot run."""
    segments = pattern.split(PIPELINE_SEPARATOR)
    for index, segment in enumerate(segments):
        if not segment:
            raise ValueError(
                f"{what} {pattern!r} has an empty pipeline stage (segment {index} of {len(segments)}, counting "
                f"from 0); every '|'-delimited stage needs at least one layer, so remove the leading, trailing or "
                f"doubled '|'"
            )
    return segments


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_ratio(value: object, name: str) -> float:
    # `not 0 <= value <= 1` is also true for NaN, so NaN is rejected here as well.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _spread(layers: list[str], symbol: str, gap: float) -> None:
    """Turn some of the Mamba layers of ``layers`` into ``symbol``, roughly one every ``gap`` Mamba layers.

    A running budget starts at ``gap``; each Mamba layer met either consumes one unit of budget or, when less than
    half a layer of budget is left, is replaced and the budget is refilled by ``gap``. This is megatron-core's
    placement rule; the float operations (start value, ``-= 1``, ``+= gap``, ``< 0.5``) are kept in exactly the same
    order so that rounding, and hence every placement, is identical. The walk, not a requested count, decides how
    many layers are placed.
    """
    budget = gap
    for index, current in enumerate(layers):
        if current != MAMBA:
            continue
        if budget < 0.5:
            layers[index] = symbol
            budget += gap
        else:
            budget -= 1


def _allocate_from_ratios(total_layers_count: int, attention_ratio: float, mlp_ratio: float) -> str:
    """Megatron-core's automatic allocation (inputs already validated)."""
    layers = [MAMBA] * total_layers_count

    # Attention first: spread evenly so that the stack starts and ends with Mamba sections of equal length.
    attention_count = round(total_layers_count * attention_ratio)
    mamba_count = total_layers_count - attention_count
    _spread(layers, ATTENTION, gap=mamba_count / (attention_count + 1))

    # Then MLP among the remaining Mamba layers, evenly but right-justified. The gap uses the *requested* counts, so
    # when the two independently rounded counts over-subscribe the stack (e.g. 3 layers at 0.5/0.5 -> 2 + 2) the gap
    # goes negative, every remaining Mamba layer becomes MLP and fewer MLP layers than requested are placed: this is
    # megatron-core's behaviour and is kept for compatibility.
    mlp_count = round(total_layers_count * mlp_ratio)
    if mlp_count > 0:
        _spread(layers, MLP, gap=(mamba_count - mlp_count) / mlp_count)
    return "".join(layers)


def allocate_layers(
    total_layers_count: int,
    target_attention_ratio: float,
    target_mlp_ratio: float,
    override_pattern: str | None = None,
) -> str:
    """Return the layer pattern of a hybrid stack, e.g. ``allocate_layers(8, 0.25, 0.25) == "MM*-M*M-"``.

    Without ``override_pattern`` the layers are placed from the ratios exactly as megatron-core 0.16's
    ``allocate_layers`` places them (``round(n * ratio)`` layers of each kind, attention evenly spaced between Mamba
    sections, then MLP spread over the remaining Mamba layers, right-justified); the rest are Mamba-2 layers. The same
    inputs therefore give the same model as Megatron, which matters for checkpoint interchange.

    With ``override_pattern`` the pattern is returned verbatim, **including any ``|`` pipeline-stage separators** it
    contains, so that the pipeline layout the user wrote travels with it (use ``strip_pipeline_separators`` to get the
    layers only; ``HybridConfig.layer_pattern`` does). It is validated first:

    * only ``M``, ``*``, ``-`` and ``|`` may appear (MoE ``E`` and MTP ``/`` of newer Megatron are rejected: this
      framework cannot build them);
    * the number of layers (``|`` not counted) must equal ``total_layers_count``;
    * ``|`` must not create an empty stage (no leading, trailing or doubled ``|``): such a stage cannot run here;
    * if either ratio is non-zero, the pattern must contain exactly as many layers of each kind as the ratios
      allocate. Megatron-core raises in this case too, and we keep its rule unchanged: non-zero ratios are a claim
      about the model's composition, so a pattern that contradicts them is a configuration error. When both ratios
      are 0 (the ``HybridConfig`` defaults, meaning "not given") the pattern is accepted as is; megatron-core then
      only *logs* the resulting ratios, and raising would reject the common "override only" configuration, so we
      do not raise either. A pattern with the right counts but a different order than the ratios would give is also
      only logged by megatron-core; it is a deliberate choice of the user, so it is accepted.

    Raises:
        ValueError: ``total_layers_count`` is not a positive integer; a ratio is outside [0, 1]; the two ratios sum
            to more than 1 (compared as ``attention + mlp <= 1.0``, exactly megatron-core's assertion, so float
            round-off such as ``0.1 + 0.9000000000000001`` is rejected the same way); or the override pattern is
            invalid as described above. megatron-core uses ``assert`` for the first three; a ValueError names the
            problem and survives ``python -O``.
        TypeError: ``override_pattern`` is neither a string nor None.
    """
    total_layers_count = _check_positive_int(total_layers_count, "total_layers_count")
    attention_ratio = _check_ratio(target_attention_ratio, "target_attention_ratio")
    mlp_ratio = _check_ratio(target_mlp_ratio, "target_mlp_ratio")
    if not attention_ratio + mlp_ratio <= 1.0:
        raise ValueError(
            f"target_attention_ratio + target_mlp_ratio must be <= 1 (the remaining layers are Mamba-2), got "
            f"{target_attention_ratio!r} + {target_mlp_ratio!r} = {attention_ratio + mlp_ratio!r}"
        )

    allocated = _allocate_from_ratios(total_layers_count, attention_ratio, mlp_ratio)
    if override_pattern is None:
        return allocated

    if not isinstance(override_pattern, str):
        raise TypeError(f"override_pattern must be a string or None, got {type(override_pattern).__name__}")
    what = "hybrid override pattern"
    _check_symbols(override_pattern, what)
    layers = strip_pipeline_separators(override_pattern)
    if len(layers) != total_layers_count:
        raise ValueError(
            f"{what} {override_pattern!r} has the wrong length: {len(layers)} layers ('|' separators not counted), "
            f"expected total_layers_count={total_layers_count}"
        )
    _check_no_empty_segments(override_pattern, what)
    if attention_ratio > 0.0 or mlp_ratio > 0.0:
        wanted, got = _symbol_counts(allocated), _symbol_counts(layers)
        if wanted != got:
            raise ValueError(
                f"{what} {override_pattern!r} contradicts the layer counts of target_attention_ratio="
                f"{target_attention_ratio!r} and target_mlp_ratio={target_mlp_ratio!r} over {total_layers_count} "
                f"layers: the pattern has {_describe_counts(got)} but the ratios allocate {_describe_counts(wanted)} "
                f"({allocated!r}); fix the pattern or set both ratios to 0 to use the pattern as is"
            )
    return override_pattern


@dataclass(frozen=True)
class StageSlice:
    """The layers one model chunk (pipeline rank x virtual stage) builds: a contiguous slice of the stripped pattern.

    Attributes:
        pipeline_rank: rank in the pipeline-parallel group.
        virtual_stage: index of the model chunk on that rank (0 without interleaving).
        stage_index: position of the chunk in execution order, ``virtual_stage * pipeline_size + pipeline_rank``.
        layer_offset: global index (0-based, in the stripped pattern) of the chunk's first layer; Megatron's
            ``layer_number`` of local layer ``i`` is ``layer_offset + i + 1``.
        symbols: the chunk's layer symbols, in order.
    """

    pipeline_rank: int
    virtual_stage: int
    stage_index: int
    layer_offset: int
    symbols: str

    @property
    def num_layers(self) -> int:
        return len(self.symbols)

    @property
    def layer_slice(self) -> slice:
        """Global layer indices as a slice of the stripped pattern (``pattern[s.layer_slice] == s.symbols``)."""
        return slice(self.layer_offset, self.layer_offset + len(self.symbols))

    @property
    def layer_indices(self) -> range:
        return range(self.layer_offset, self.layer_offset + len(self.symbols))


def _stage_sizes_without_separators(
    num_layers: int,
    pipeline_size: int,
    virtual_stages: int,
    first_stage_layers: int | None,
    last_stage_layers: int | None,
) -> list[int]:
    """Layer count of every stage, in execution order, for a pattern without ``|``."""
    num_stages = pipeline_size * virtual_stages
    if first_stage_layers is None and last_stage_layers is None:
        if num_layers % num_stages:
            raise ValueError(
                f"cannot split {num_layers} layers evenly over pipeline_size={pipeline_size} x "
                f"virtual_stages={virtual_stages} = {num_stages} stages; add '|' separators to the pattern to place "
                f"the stage boundaries explicitly"
                + (", or set first_stage_layers / last_stage_layers" if virtual_stages == 1 else "")
            )
        return [num_layers // num_stages] * num_stages

    # Megatron's uneven split (--decoder-first/last-pipeline-num-layers); like Megatron's hybrid stack we support it
    # without interleaving only.
    if virtual_stages != 1:
        raise ValueError(
            "first_stage_layers / last_stage_layers cannot be combined with virtual_stages > 1; write the stage "
            "boundaries into the pattern with '|' instead"
        )
    if pipeline_size < 2:
        raise ValueError("first_stage_layers / last_stage_layers need pipeline_size >= 2")
    first = 0 if first_stage_layers is None else _check_positive_int(first_stage_layers, "first_stage_layers")
    last = 0 if last_stage_layers is None else _check_positive_int(last_stage_layers, "last_stage_layers")
    middle_stages = pipeline_size - (first_stage_layers is not None) - (last_stage_layers is not None)
    middle_layers = num_layers - first - last
    if middle_stages == 0:
        if middle_layers != 0:
            raise ValueError(
                f"first_stage_layers={first} + last_stage_layers={last} must equal the {num_layers} layers when "
                f"pipeline_size={pipeline_size} leaves no middle stage"
            )
        per_middle = 0
    else:
        if middle_layers <= 0 or middle_layers % middle_stages:
            raise ValueError(
                f"the {middle_layers} layers left after first_stage_layers={first_stage_layers} and "
                f"last_stage_layers={last_stage_layers} cannot be split evenly and non-empty over the "
                f"{middle_stages} remaining pipeline stages"
            )
        per_middle = middle_layers // middle_stages
    sizes = [per_middle] * middle_stages
    if first_stage_layers is not None:
        sizes.insert(0, first)
    if last_stage_layers is not None:
        sizes.append(last)
    return sizes


def split_pattern_for_pipeline(
    pattern: str,
    pipeline_size: int,
    virtual_stages: int = 1,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[list[StageSlice]]:
    """Assign the layers of ``pattern`` to pipeline ranks and virtual stages.

    Returns ``result[pipeline_rank][virtual_stage]``, a ``StageSlice`` with the chunk's symbols and global layer
    offset. Stages are contiguous slices of the stripped pattern taken in execution order; with interleaving, chunk
    ``v`` of rank ``r`` is stage ``v * pipeline_size + r`` (Megatron's interleaved schedule order).

    * Pattern with ``|``: each ``|``-delimited segment is one stage, in order, as in Megatron-LM's hybrid models;
      the number of segments must equal ``pipeline_size * virtual_stages`` and none may be empty (Megatron-LM also
      accepts empty segments and a segment count that is only a multiple of ``pipeline_size``; we require the layout
      to be explicit and every stage to hold a layer). ``first_stage_layers`` / ``last_stage_layers`` are rejected
      because the separators already define the layout.
    * Pattern without ``|``: the layers are split evenly, which requires ``pipeline_size * virtual_stages`` to divide
      the layer count; this is the layout an equivalent pattern with a ``|`` every ``n / stages`` layers describes.
      Optionally, without interleaving, Megatron's uneven split: ``first_stage_layers`` and/or ``last_stage_layers``
      layers on the first/last rank and the rest split evenly over the other ranks.

    Raises:
        ValueError: invalid sizes or symbols, a segment count that does not match, an empty stage, or layers that
            cannot be split evenly.
        TypeError: ``pattern`` is not a string.
    """
    pipeline_size = _check_positive_int(pipeline_size, "pipeline_size")
    virtual_stages = _check_positive_int(virtual_stages, "virtual_stages")
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    what = "layer pattern"
    _check_symbols(pattern, what)
    num_stages = pipeline_size * virtual_stages
    layers = strip_pipeline_separators(pattern)
    if not layers:
        raise ValueError(f"{what} {pattern!r} has no layers")

    if PIPELINE_SEPARATOR in pattern:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ValueError(
                f"first_stage_layers / last_stage_layers cannot be used with {what} {pattern!r}: its '|' separators "
                f"already define the pipeline layout"
            )
        segments = pattern.split(PIPELINE_SEPARATOR)
        if len(segments) != num_stages:
            raise ValueError(
                f"{what} {pattern!r} has {len(segments) - 1} '|' separators, i.e. {len(segments)} pipeline stages, "
                f"but pipeline_size={pipeline_size} x virtual_stages={virtual_stages} needs {num_stages} stages "
                f"({num_stages - 1} separators)"
            )
        _check_no_empty_segments(pattern, what)
        sizes = [len(segment) for segment in segments]
    else:
        sizes = _stage_sizes_without_separators(
            len(layers), pipeline_size, virtual_stages, first_stage_layers, last_stage_layers
        )

    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)

    def chunk_of(rank: int, chunk: int) -> StageSlice:
        stage = chunk * pipeline_size + rank
        start = offsets[stage]
        return StageSlice(rank, chunk, stage, start, layers[start : start + sizes[stage]])

    return [[chunk_of(rank, chunk) for chunk in range(virtual_stages)] for rank in range(pipeline_size)]


def pipeline_stage_count(pattern: str) -> int:
    """Number of ``|``-delimited segments of ``pattern`` (1 when it has no separator)."""
    return pattern.count(PIPELINE_SEPARATOR) + 1


__all__ = [
    "ATTENTION",
    "LAYER_SYMBOLS",
    "MAMBA",
    "MLP",
    "PIPELINE_SEPARATOR",
    "StageSlice",
    "allocate_layers",
    "pipeline_stage_count",
    "split_pattern_for_pipeline",
    "strip_pipeline_separators",
]
