"""Triton's CPU interpreter for the kernel tests of this folder (``test_ops_triton_conv1d``, ``test_triton_decode``,
``test_triton_add_norm_attention``, ``test_triton_gemv``, ``test_triton_fused_gemv``, ``test_triton_argmax``).

``TRITON_INTERPRET=1`` must be set before triton itself is imported (its own ``@jit`` helpers such as ``tl.zeros`` are
built at import time), so a test module calls :func:`interpret_if_possible` before importing triton: it sets the
variable at collection when triton is not imported yet and no GPU is present. Otherwise (triton already imported, or a
GPU machine, where the interpreter must not leak into mamba_ssm's kernels) :func:`is_interpreted` is False, the
module's interpreter tests skip, and its ``test_in_a_fresh_process`` runs them in a subprocess
(:func:`run_in_fresh_process`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron_hybrid.ops import mamba_ssm_loader

_PREVIOUS = os.environ.get("TRITON_INTERPRET")  # before the first test module of the session set it
_SHARED_JIT_HELPERS = "megatron_hybrid.ops._triton_common"


def interpret_if_possible() -> None:
    """Turn the interpreter on for the triton import that follows, where that is safe (see the module docstring)."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def is_interpreted(triton: ModuleType) -> bool:
    """Whether ``triton`` was imported with the interpreter on."""
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


def interpreter_only(triton: ModuleType) -> pytest.MarkDecorator:
    """The mark of a module's interpreter tests: skipped when ``triton`` was imported without the interpreter (the
    module's ``fresh_process_test`` then runs them)."""
    return pytest.mark.skipif(
        not is_interpreted(triton),
        reason="triton was imported without TRITON_INTERPRET=1; test_in_a_fresh_process runs these",
    )


def fresh_process_test(triton: ModuleType, test_file: str) -> Callable[[], None]:
    """A module's ``test_in_a_fresh_process``: runs ``test_file`` in a new interpreter process with the interpreter on,
    unless ``triton`` is interpreted here already (then this process runs the tests, and it skips)."""

    @pytest.mark.skipif(is_interpreted(triton), reason="the tests of this module run in this process")
    def test_in_a_fresh_process() -> None:
        run_in_fresh_process(test_file)

    return test_in_a_fresh_process


def import_interpreted(module_name: str) -> ModuleType:
    """``module_name`` (re)imported with the interpreter on (another test module's teardown may have unset it), after
    the shared jit helpers: a kernel interpreted now must not call helpers compiled for a GPU."""
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.reload(importlib.import_module(_SHARED_JIT_HELPERS))
    if module_name in sys.modules:
        return importlib.reload(sys.modules[module_name])
    return importlib.import_module(module_name)


def interpreted_kernel_modules(*module_names: str) -> Iterator[ModuleType | tuple[ModuleType, ...]]:
    """The body of a module-scoped fixture (``yield from`` it): the kernel modules (re)imported with the interpreter on
    (another test module's teardown may have unset it), the test skipped when one cannot load; the kernel cache reset
    around the tests, and the environment restored after them. Yields the module, or a tuple of several."""
    modules = []
    for name in module_names:
        try:
            module = import_interpreted(name)
        except ImportError as exc:  # e.g. a triton without an op the module needs
            pytest.skip(f"{name} cannot be imported: {exc}")
        if getattr(module, "UNAVAILABLE_REASON", None) is not None:
            pytest.skip(module.UNAVAILABLE_REASON)
        modules.append(module)
    mamba_ssm_loader.reset_kernel_cache()
    yield modules[0] if len(modules) == 1 else tuple(modules)
    mamba_ssm_loader.reset_kernel_cache()
    restore_environment()


def restore_environment() -> None:
    """``TRITON_INTERPRET`` as it was before: kernels defined so far keep their mode; later imports get the default."""
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS


def run_in_fresh_process(test_file: str) -> None:
    """Run the test module ``test_file`` in a new interpreter with ``TRITON_INTERPRET=1``; fail with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
