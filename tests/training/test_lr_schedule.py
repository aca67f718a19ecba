"""LR / weight-decay schedules: closed forms, and megatron-core's OptimizerParamScheduler as an oracle."""

from __future__ import annotations

import math
import warnings

import pytest

from megatron_hybrid.training.lr_scheduler import OptimizerParamScheduler

MAX, MIN, INIT, W, D = 1e-3, 1e-4, 1e-5, 40, 400


def make(style: str, **kw) -> OptimizerParamScheduler:
    args = dict(init_lr=INIT, max_lr=MAX, min_lr=MIN, lr_warmup_steps=W, lr_decay_steps=D, lr_decay_style=style)
    args.update(kw)
    return OptimizerParamScheduler(**args)


def closed_form(style: str, n: float, wsd_style: str = "linear", anneal: float = 100) -> float:
    if n <= W:
        return INIT + (MAX - INIT) * n / W
    if style == "constant":
        return MAX
    if n > D:
        return MIN
    r = (n - W) / (D - W)
    if style == "linear":
        return MIN + (1 - r) * (MAX - MIN)
    if style == "cosine":
        return MIN + 0.5 * (1 + math.cos(math.pi * r)) * (MAX - MIN)
    if style == "inverse-square-root":
        return max(MIN, MAX * math.sqrt(W) / math.sqrt(n))
    assert style == "WSD"
    if n <= D - anneal:
        return MAX
    q = (n - (D - anneal)) / anneal
    coeff = {"linear": 1 - q, "cosine": 0.5 * (1 + math.cos(math.pi * q)), "exponential": 2 * 0.5**q - 1,
             "minus_sqrt": 1 - math.sqrt(q)}[wsd_style]
    return MIN + coeff * (MAX - MIN)


POINTS = [0, 1, 20, 39, 40, 41, 100, 220, 299, 300, 301, 350, 399, 400, 401, 1000]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_closed_forms(style: str) -> None:
    sched = make(style)
    for n in POINTS:
        assert sched.get_lr(n) == pytest.approx(closed_form(style, n), rel=1e-12, abs=1e-15), (style, n)


@pytest.mark.parametrize("wsd_style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_closed_forms(wsd_style: str) -> None:
    sched = make("WSD", wsd_decay_steps=100, lr_wsd_decay_style=wsd_style)
    for n in POINTS:
        assert sched.get_lr(n) == pytest.approx(closed_form("WSD", n, wsd_style), rel=1e-12, abs=1e-15), n


def test_warmup_starts_at_init_and_min_lr_floor() -> None:
    sched = make("cosine")
    assert sched.get_lr(0) == INIT and sched.get_lr(W) == MAX and sched.get_lr(D) == pytest.approx(MIN)
    assert sched.get_lr(10 * D) == MIN
    no_warmup = make("linear", lr_warmup_steps=0)
    assert no_warmup.get_lr(0) == MAX


def test_step_apply_and_weight_decay_multipliers() -> None:
    sched = make("linear", start_wd=0.0, end_wd=0.1, wd_incr_steps=400, wd_incr_style="linear")

    class Opt:
        param_groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]

    sched.step(8)
    lr, wd = sched.apply(Opt)
    assert lr == closed_form("linear", 8) and wd == pytest.approx(0.1 * 8 / 400)
    assert Opt.param_groups[0]["weight_decay"] == wd and Opt.param_groups[1]["weight_decay"] == 0.0
    assert Opt.param_groups[0]["lr"] == Opt.param_groups[1]["lr"] == lr
    cosine = make("linear", start_wd=0.0, end_wd=0.1, wd_incr_steps=400, wd_incr_style="cosine")
    assert cosine.get_wd(200) == pytest.approx(0.05) and cosine.get_wd(1000) == 0.1
    state = sched.state_dict()
    other = make("linear", max_lr=2e-3, start_wd=0.0, end_wd=0.1, wd_incr_steps=400, wd_incr_style="linear")
    diffs = other.load_state_dict(state)
    assert other.num_steps == 8 and any(d.startswith("max_lr") for d in diffs)


def test_invalid_schedules_are_rejected() -> None:
    with pytest.raises(ValueError, match="warmup"):
        make("cosine", lr_warmup_steps=D)
    with pytest.raises(ValueError, match="wsd_decay_steps"):
        make("WSD")
    with pytest.raises(ValueError, match="min_lr"):
        make("cosine", min_lr=1.0)


@pytest.mark.parametrize(
    ("style", "wsd_style"),
    [("constant", None), ("linear", None), ("cosine", None), ("inverse-square-root", None), ("WSD", "linear"),
     ("WSD", "cosine"), ("WSD", "exponential"), ("WSD", "minus_sqrt")],
)
def test_matches_megatron_core(style: str, wsd_style: str | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle_module = pytest.importorskip("megatron.core.optimizer_param_scheduler")

    class Opt:
        param_groups = [{}]

    kw = dict(init_lr=INIT, max_lr=MAX, min_lr=MIN, lr_warmup_steps=W, lr_decay_steps=D, lr_decay_style=style,
              start_wd=0.01, end_wd=0.01, wd_incr_steps=D, wd_incr_style="constant")
    wsd = dict(wsd_decay_steps=100, lr_wsd_decay_style=wsd_style) if wsd_style else {}
    oracle = oracle_module.OptimizerParamScheduler(Opt(), **kw, **wsd)
    ours = OptimizerParamScheduler(**kw, **wsd)
    for increment in [0] + [8] * 60:
        oracle.step(increment)
        ours.step(increment)
        assert ours.get_lr() == oracle.get_lr({}), (style, ours.num_steps)
        assert ours.get_wd() == oracle.get_wd()
