"""Fixtures of the training tests (defined in training_helpers.py)."""

from __future__ import annotations

from training_helpers import byte_data

__all__ = ["byte_data"]
