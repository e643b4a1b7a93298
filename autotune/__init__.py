"""rope-autotune's offline tuner: an Optuna search over RoPE providers and Triton kernel
configs, measured on the device, written as a per-device JSON table.

Run it as ``python -m autotune`` (see ``--help``) or call :func:`tune`.
"""

from __future__ import annotations

# Without the tune extra, or with another package named kernels, the imports fail: the package
# still imports, so that ``python -m autotune`` can say what to install, and each name raises the
# reason when used.
try:
    from .export import best_entry, build_tables, export_tables, write_device_table
    from .models import (
        DEFAULT_TOKENS,
        MODEL_PRESETS,
        ModelPreset,
        default_specs,
        get_preset,
        load_hf_config,
        parse_tokens,
        shard_heads,
        spec_from_hf_config,
    )
    from .search import CandidateSpace, StudyKey, StudyRunner, study_name
    from .storage import StorageError, open_storage
    from .tune import DEFAULT_TRIALS, DeviceError, format_summary, resolve_device, tune
except ImportError as _import_error:
    _IMPORT_ERROR: ImportError | None = _import_error
else:
    _IMPORT_ERROR = None


def __getattr__(name: str):
    if _IMPORT_ERROR is not None and name in __all__:
        from ._environment import environment_problem

        raise ImportError(f"autotune.{name}: {environment_problem() or _IMPORT_ERROR}") from (
            _IMPORT_ERROR
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_TOKENS",
    "DEFAULT_TRIALS",
    "MODEL_PRESETS",
    "CandidateSpace",
    "DeviceError",
    "ModelPreset",
    "StorageError",
    "StudyKey",
    "StudyRunner",
    "best_entry",
    "build_tables",
    "default_specs",
    "export_tables",
    "format_summary",
    "get_preset",
    "load_hf_config",
    "open_storage",
    "parse_tokens",
    "resolve_device",
    "shard_heads",
    "spec_from_hf_config",
    "study_name",
    "tune",
    "write_device_table",
]
