"""Specs from the tuner's model presets and Hugging Face configs (``autotune.models``).

The only place the bench depends on the tuner's model module, imported when first needed so
that the bench runs without it for explicit specs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import RopeSpec

__all__ = ["model_specs"]


def model_specs(
    models: Sequence[str],
    model_configs: Sequence[str],
    *,
    tensor_parallel_size: int,
    dtypes: Sequence[torch.dtype] | None,
    is_neox: bool | None,
) -> list[RopeSpec]:
    """The specs of model presets and Hugging Face ``config.json`` files, on one GPU's share of
    the heads.

    Args:
        models: Preset names (``llama-3-8b``, ...; ``python -m autotune --list-models``).
        model_configs: Paths to ``config.json`` files or directories holding one.
        tensor_parallel_size: GPUs the heads are split over.
        dtypes: Element types; None for bfloat16 (presets) or the config's own ``torch_dtype``.
        is_neox: Rope style of the ``model_configs``; None for the config's own.

    Raises:
        ValueError: an unknown preset, a bad config, a tensor-parallel size that does not
            divide the heads, or ``autotune.models`` missing.
    """
    try:
        from autotune.models import model_specs as _model_specs
    except ImportError as exc:
        raise ValueError(
            "--model/--model-config: need autotune.models (the tuner's model presets), which "
            f"this installation lacks ({exc}); give the spec with --head-size, --rotary-dim, "
            "--num-heads and --num-kv-heads instead"
        ) from None
    return _model_specs(
        models,
        model_configs,
        tensor_parallel_size=tensor_parallel_size,
        dtypes=dtypes,
        is_neox=is_neox,
        preset_dtypes=(torch.bfloat16,),
    )
