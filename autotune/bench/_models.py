"""Specs from the tuner's model presets and Hugging Face configs (:mod:`autotune.models`), with
the bench's default dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import RopeSpec

from ..models import model_specs as _model_specs

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
        ValueError: an unknown preset, a bad config (the message names the field), a model
            with mRoPE, or a tensor-parallel size that does not divide the heads.
    """
    return _model_specs(
        models,
        model_configs,
        tensor_parallel_size=tensor_parallel_size,
        dtypes=dtypes,
        is_neox=is_neox,
        preset_dtypes=(torch.bfloat16,),
    )
