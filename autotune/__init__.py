"""rope-autotune's offline tuner: an Optuna search over RoPE providers and Triton kernel
configs, measured on the device, written as a per-device JSON table.

Run it as ``python -m autotune`` (see ``--help``) or call :func:`tune`. The tuner needs the
``tune`` extra (``pip install 'rope-autotune[tune]'``); its names are imported on first use, so
``import autotune`` works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._device import DeviceError
    from .export import export_tables
    from .models import (
        DEFAULT_TOKENS,
        MODEL_PRESETS,
        ModelPreset,
        default_specs,
        get_preset,
        load_hf_config,
        model_specs,
        spec_from_hf_config,
    )
    from .storage import open_storage
    from .tuning import DEFAULT_TRIALS, tune

# Public name -> the module that defines it.
_EXPORTS = {
    "DEFAULT_TOKENS": ".models",
    "DEFAULT_TRIALS": ".tuning",
    "MODEL_PRESETS": ".models",
    "DeviceError": "._device",
    "ModelPreset": ".models",
    "default_specs": ".models",
    "export_tables": ".export",
    "get_preset": ".models",
    "load_hf_config": ".models",
    "model_specs": ".models",
    "open_storage": ".storage",
    "spec_from_hf_config": ".models",
    "tune": ".tuning",
}

__all__ = [
    "DEFAULT_TOKENS",
    "DEFAULT_TRIALS",
    "MODEL_PRESETS",
    "DeviceError",
    "ModelPreset",
    "default_specs",
    "export_tables",
    "get_preset",
    "load_hf_config",
    "model_specs",
    "open_storage",
    "spec_from_hf_config",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
