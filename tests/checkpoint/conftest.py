"""Fixtures of the checkpoint tests: the training tests' helpers (byte-level stdlib data, tiny model flags)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "training"))

from training_helpers import byte_data  # noqa: E402

__all__ = ["byte_data"]
