"""Distributed setup, checkpointing and logging shared by every biorecipes recipe.

The public API is importable from the package (`from biorecipes_shared import TrainingRun, run_cli`). Names load
lazily (PEP 562) so that `import biorecipes_shared.stop_signals`, which every training entry runs first, does not
pull in torch before its signal handlers are installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "checkpoint": ("CheckpointError", "CheckpointState", "latest_checkpoint", "load_checkpoint", "peek_checkpoint",
                   "save_checkpoint", "verify_checkpoint"),
    "config": ("load_config", "rename_keys", "rename_overrides"),
    "distributed": ("DistributedContext", "all_reduce_max", "all_reduce_mean", "barrier", "is_main_process",
                    "read_launch_env", "seed_everything", "setup_distributed", "teardown_distributed"),
    "export": ("export_safetensors", "unwrap_model"),
    "fsdp_checkpoint": ("gather_full_state_dict",),
    "files": ("WriteError", "atomic_dir", "atomic_write", "atomic_write_json", "describe_write_error"),
    "logging_utils": ("MetricsWriter", "ThroughputMeter", "get_logger", "interleaved_medians", "peak_memory",
                      "plot_loss_curve", "read_metrics"),
    "preemption": ("PreemptionHandler",),
    "run": ("ConfigError", "RunError", "RunLayout", "check_settings", "finished_run", "mark_finished",
            "recorded_differences", "resolve_resume", "run_cli"),
    "run_lock": ("RunFolderBusy",),
    "training_run": ("TrainingRun",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'biorecipes_shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
