"""Learning-rate and weight-decay schedules with Megatron-LM's OptimizerParamScheduler semantics.

Why Megatron's exact math: a run configured with Megatron flags must follow the same LR curve (same warmup start,
same decay length in *samples*, same WSD annealing shapes), so loss curves are comparable across the frameworks.

Steps are counted in samples: after every successful optimizer step the scheduler advances by the global batch size
(a skipped step does not advance it). With ``n`` samples consumed, ``W`` warmup and ``D`` decay samples:

* warmup (``W > 0`` and ``n <= W``): ``init + (max - init) * n / W`` (so the very first step uses ``init``);
* ``constant``: ``max`` after warmup;
* ``n > D``: ``min``;
* ``inverse-square-root``: ``max(min, max * sqrt(max(W, 1)) / sqrt(max(n, 1)))``;
* otherwise with ``r = (n - W) / (D - W)``: ``min + c * (max - min)`` where ``c`` is ``1 - r`` (linear),
  ``(cos(pi r) + 1) / 2`` (cosine) or, for ``WSD`` with an annealing phase of ``A`` samples, 1 until ``D - A`` and
  then with ``q = (n - (D - A)) / A``: ``2 * 0.5**q - 1`` (exponential), ``1 - q`` (linear),
  ``(cos(pi q) + 1) / 2`` (cosine) or ``1 - sqrt(q)`` (minus_sqrt).

Weight decay goes from ``start`` to ``end`` over ``wd_incr_steps`` samples: constant, linear (``r``) or cosine
(``(cos(pi (1 - r)) + 1) / 2``). Each optimizer parameter group is scaled by its ``wd_mult`` (0 for the groups that
take no weight decay).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["OptimizerParamScheduler"]


class OptimizerParamScheduler:
    """LR / weight-decay schedule of a run. ``state_dict`` is plain JSON-able data (saved in checkpoints)."""

    def __init__(
        self,
        *,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: float,
        lr_decay_steps: float,
        lr_decay_style: str,
        start_wd: float = 0.0,
        end_wd: float = 0.0,
        wd_incr_steps: float = 1,
        wd_incr_style: str = "constant",
        wsd_decay_steps: float | None = None,
        lr_wsd_decay_style: str | None = None,
    ) -> None:
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        if init_lr > max_lr:
            raise ValueError(f"init_lr {init_lr} is above max_lr {max_lr}")
        if lr_decay_steps <= 0:
            raise ValueError(f"lr_decay_steps must be positive, got {lr_decay_steps}")
        if lr_decay_style != "constant" and lr_warmup_steps >= lr_decay_steps:
            raise ValueError(f"warmup ({lr_warmup_steps}) must be shorter than the decay ({lr_decay_steps})")
        if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            raise ValueError(f"unknown lr_decay_style {lr_decay_style!r}")
        if lr_decay_style == "WSD":
            if wsd_decay_steps is None or not 0 < wsd_decay_steps:
                raise ValueError("the WSD schedule needs a positive wsd_decay_steps")
            if lr_wsd_decay_style not in ("exponential", "linear", "cosine", "minus_sqrt"):
                raise ValueError(f"unknown lr_wsd_decay_style {lr_wsd_decay_style!r}")
        if wd_incr_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown wd_incr_style {wd_incr_style!r}")
        if wd_incr_style == "constant" and start_wd != end_wd:
            raise ValueError("a constant weight decay needs start_wd == end_wd")
        if not 0.0 <= start_wd <= end_wd:
            raise ValueError(f"need 0 <= start_wd <= end_wd, got {start_wd}, {end_wd}")
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.num_steps = 0

    # -- the schedules ---------------------------------------------------------------------------------------------
    def get_lr(self, num_steps: float | None = None) -> float:
        """Learning rate after ``num_steps`` samples (default: the current position)."""
        n = self.num_steps if num_steps is None else num_steps
        max_lr, min_lr = self.max_lr, self.min_lr
        if self.lr_warmup_steps > 0 and n <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(n) / float(self.lr_warmup_steps)
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup = max(self.lr_warmup_steps, 1)
            return max(min_lr, max_lr * warmup**0.5 / max(n, 1) ** 0.5)
        ratio = float(n - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            assert self.wsd_decay_steps is not None
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                q = float(n - anneal_start) / float(self.wsd_decay_steps)
                if self.lr_wsd_decay_style == "linear":
                    coeff = 1.0 - q
                elif self.lr_wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * q) + 1.0)
                elif self.lr_wsd_decay_style == "exponential":
                    coeff = 2.0 * math.pow(0.5, q) - 1.0
                else:  # minus_sqrt
                    coeff = 1.0 - math.sqrt(q)
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self, num_steps: float | None = None) -> float:
        """Weight decay after ``num_steps`` samples (before each group's ``wd_mult``)."""
        n = self.num_steps if num_steps is None else num_steps
        if n > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = float(n) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    # -- driving an optimizer ----------------------------------------------------------------------------------------
    def apply(self, optimizer: Any) -> tuple[float, float]:
        """Write the current lr and weight decay (x each group's ``wd_mult``) into ``optimizer.param_groups``."""
        lr, wd = self.get_lr(), self.get_wd()
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr, wd

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples (the global batch size of a successful step)."""
        self.num_steps += increment

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "init_lr": self.init_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_decay_style": self.lr_decay_style,
            "wsd_decay_steps": self.wsd_decay_steps,
            "lr_wsd_decay_style": self.lr_wsd_decay_style,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_steps": self.wd_incr_steps,
            "wd_incr_style": self.wd_incr_style,
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore the position; return the schedule settings that differ from the checkpoint's.

        The schedule's shape always comes from the current run's flags (changing ``--lr`` on resume takes effect);
        Megatron refuses such a change unless told to override, here the differences are returned so the trainer can
        print them.
        """
        self.num_steps = state["num_steps"]
        current = self.state_dict()
        return [f"{key}: checkpoint {state[key]!r} -> now {current[key]!r}" for key in current
                if key != "num_steps" and key in state and state[key] != current[key]]
