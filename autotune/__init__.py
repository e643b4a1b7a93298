"""rope-autotune's offline tuner: an Optuna search over RoPE providers and Triton kernel
configs, measured on the device, written as a per-device JSON table.

Run it as ``python -m autotune`` (see ``--help``) or call :func:`tune`.
"""

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
from .search import CandidateSpace, StudyKey, StudyRunner, open_storage, study_name
from .tune import DEFAULT_TRIALS, DeviceError, format_summary, resolve_device, tune

__all__ = [
    "DEFAULT_TOKENS",
    "DEFAULT_TRIALS",
    "MODEL_PRESETS",
    "CandidateSpace",
    "DeviceError",
    "ModelPreset",
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
