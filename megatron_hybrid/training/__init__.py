"""Training: the run configuration (Megatron flags), the pretraining loop, AdamW + schedules, FLOP accounting.

Entry points: ``pretrain_mamba.py`` / ``python -m megatron_hybrid.train`` (command line) and :func:`pretrain`
(Python: ``pretrain(make_run_config(...))`` or ``pretrain(["--num-layers", "4", ...])``).
"""

from megatron_hybrid.training.arguments import (
    ConfigError,
    ModelFlags,
    ParallelConfig,
    ResolvedRun,
    RunConfig,
    TrainingConfig,
    build_parser,
    make_run_config,
    parse_args,
    resolve,
)
from megatron_hybrid.training.loop import TrainingAborted, TrainResult, main, pretrain
from megatron_hybrid.training.lr_scheduler import OptimizerParamScheduler
from megatron_hybrid.training.optimizer import TrainOptimizer, takes_weight_decay, weight_decay_groups

__all__ = [
    "ConfigError",
    "ModelFlags",
    "OptimizerParamScheduler",
    "ParallelConfig",
    "ResolvedRun",
    "RunConfig",
    "TrainOptimizer",
    "TrainResult",
    "TrainingAborted",
    "TrainingConfig",
    "build_parser",
    "main",
    "make_run_config",
    "parse_args",
    "pretrain",
    "resolve",
    "takes_weight_decay",
    "weight_decay_groups",
]
