"""Module specs: describe *which* implementation builds each part of a model, separately from the code that uses it.

A spec names a module class (or factory), the keyword parameters it is built with, and the specs of its own
sub-modules. Swapping an implementation (torch-native attention for a Transformer-Engine one, say) is then a change of
spec, never a change of the model code: the model asks ``build_module(spec, config=..., ...)`` and gets whatever the
spec says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModuleSpec:
    """What to build: ``module`` (a class or callable), fixed ``params``, and ``submodules`` handed to it."""

    module: Any
    params: dict[str, Any] = field(default_factory=dict)
    submodules: Any = None

    def __post_init__(self) -> None:
        if not callable(self.module):
            raise TypeError(f"ModuleSpec.module must be a class or callable, got {self.module!r}")


def build_module(spec: ModuleSpec | type | Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Instantiate ``spec``.

    A bare class or callable is called with ``*args, **kwargs``. A ``ModuleSpec`` is called with its ``params`` merged
    under the call's keyword arguments (the call wins), plus ``submodules=`` when the spec has any.
    """
    if isinstance(spec, ModuleSpec):
        merged = {**spec.params, **kwargs}
        if spec.submodules is not None:
            merged["submodules"] = spec.submodules
        return spec.module(*args, **merged)
    if callable(spec):
        return spec(*args, **kwargs)
    raise TypeError(f"cannot build a module from {spec!r}: expected a ModuleSpec, a class or a callable")
