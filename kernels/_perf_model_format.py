"""The performance model's file: its schema, its validation, and each provider's features.

File (``NVIDIA H200`` -> ``NVIDIA_H200.model.json``, beside the table)::

    {
      "schema_version": 1,
      "features_version": 2,
      "metadata": {"device_name": "NVIDIA H200", "sm_count": 132, ...},   # as in tables
      "providers": {                                # keyed by provider name
        "triton": {
          "features": ["log_traffic", "log_tokens", ...],   # feature_names(name), in order
          "base": 1.9, "learning_rate": 0.1,
          "trees": [{"feature": [3, -1, ...], "threshold": [...], "left": [1, -1, ...],
                     "right": [2, -1, ...], "value": [...]}, ...]
        },
        "vllm": {...}, ...
      },
      "fit": {...}        # free-form: rows, residuals, "specs" (the shapes fit on: what it covers)
    }

A tree's node ``i`` is a leaf when ``left[i] == -1`` (its ``value`` is added); otherwise a call
goes to ``left[i]`` when ``float32(x[feature[i]]) <= float32(threshold[i])``, else to ``right[i]``
(features and thresholds compared as float32, as the fitting library does); children
come after their parent. The prediction is ``exp(base + learning_rate * sum of leaf values)``.
``features`` must equal that provider's names under ``features_version`` (a changed definition
bumps it, and an older file is refused rather than misread); a provider not registered here is
read with the call's features alone. Public names are re-exported by :mod:`kernels.perf_model`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._spec import RopeSpec
from .perf_features import FEATURES_VERSION
from .providers import Provider, get_provider
from .table import device_table_name

__all__ = [
    "SCHEMA_VERSION",
    "PerfModelError",
    "described",
    "feature_names",
    "features",
    "model_file_name",
    "validate_model",
]

SCHEMA_VERSION = 1

# -- providers' features -------------------------------------------------------------------------


def described(provider: str) -> Provider:
    """The registered provider called ``provider``; one not registered here (a plugin not
    imported) is described as untunable, by the call's features alone."""
    try:
        return get_provider(provider)
    except KeyError:
        return Provider(provider, "not registered")


def feature_names(provider: str) -> tuple[str, ...]:
    """The features (in order) of ``provider``'s model under :data:`FEATURES_VERSION`."""
    return described(provider).feature_names()


def features(
    provider: str,
    spec: RopeSpec,
    tokens: int,
    config: Mapping[str, Any] | None = None,
    *,
    sm_count: int,
) -> list[float]:
    """Feature vector of one call (order of :func:`feature_names`): the provider's
    :meth:`~kernels.providers.Provider.features`.

    Args:
        provider: Provider name; a tunable one needs its complete ``config``.
        tokens: Token count, at least 1.
        sm_count: The device's streaming multiprocessors (the model file's metadata; 1 when
            it has none, as for a CPU).
    """
    return described(provider).features(spec, tokens, config, sm_count=sm_count)


# -- the file ----------------------------------------------------------------------------------

# A file is read by serving processes: bound what it may ask them to allocate.
_MAX_TREES = 2000
_MAX_NODES = 1 << 12
_TREE_FIELDS = ("feature", "threshold", "left", "right", "value")


class PerfModelError(ValueError):
    """A model file that cannot be used; the message names the fault."""


def model_file_name(device_name: str) -> str:
    """``NVIDIA H200`` -> ``NVIDIA_H200.model.json`` (the table's name, ``.model`` added)."""
    return device_table_name(device_name).removesuffix(".json") + ".model.json"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_tree(where: str, tree: Any, num_features: int) -> None:
    if not isinstance(tree, dict) or any(not isinstance(tree.get(f), list) for f in _TREE_FIELDS):
        raise PerfModelError(f"{where}: expected an object of lists {_TREE_FIELDS}")
    size = len(tree["left"])
    if not 1 <= size <= _MAX_NODES or any(len(tree[f]) != size for f in _TREE_FIELDS):
        raise PerfModelError(f"{where}: expected 1 to {_MAX_NODES} nodes, every list as long")
    for i in range(size):
        left, right, feature = tree["left"][i], tree["right"][i], tree["feature"][i]
        if not (_is_int(left) and _is_int(right) and _is_int(feature)):
            raise PerfModelError(f"{where}: node {i}: left, right and feature must be ints")
        if not (_finite(tree["value"][i]) and _finite(tree["threshold"][i])):
            raise PerfModelError(f"{where}: node {i}: value and threshold must be finite")
        if left == -1:
            continue
        # Children after their parent: every walk ends, within the tree.
        if not (i < left < size and i < right < size and 0 <= feature < num_features):
            raise PerfModelError(
                f"{where}: node {i}: children must follow it inside the tree and the feature "
                f"index be below {num_features}"
            )


def validate_model(model: Any) -> None:
    """Check a decoded model file against the schema.

    Raises:
        PerfModelError: the first fault found, with its path in the file.
    """
    if not isinstance(model, dict):
        raise PerfModelError(f"expected a JSON object at the top, got {type(model).__name__}")
    if model.get("schema_version") != SCHEMA_VERSION:
        raise PerfModelError(
            f"schema_version: expected {SCHEMA_VERSION}, got {model.get('schema_version')!r}"
        )
    if model.get("features_version") != FEATURES_VERSION:
        raise PerfModelError(
            f"features_version: expected {FEATURES_VERSION}, got "
            f"{model.get('features_version')!r} (refit: python -m autotune.perf_model_fit)"
        )
    metadata = model.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("device_name"), str):
        raise PerfModelError("metadata: expected an object with a device_name string")
    sms = metadata.get("sm_count")
    if sms is not None and not (_is_int(sms) and sms > 0):
        raise PerfModelError(f"metadata.sm_count: expected a positive int or null, got {sms!r}")
    providers = model.get("providers")
    if not isinstance(providers, dict) or not providers:
        raise PerfModelError("providers: expected a non-empty object keyed by provider name")
    for name, part in providers.items():
        where = f"providers.{name}"
        if not isinstance(part, dict):
            raise PerfModelError(f"{where}: expected an object")
        expected = list(feature_names(name))
        if part.get("features") != expected:
            raise PerfModelError(
                f"{where}.features: expected {expected} under features_version "
                f"{FEATURES_VERSION}, got {part.get('features')!r}"
            )
        for field in ("base", "learning_rate"):
            if not _finite(part.get(field)):
                raise PerfModelError(f"{where}.{field}: expected a finite number")
        trees = part.get("trees")
        if not isinstance(trees, list) or not 1 <= len(trees) <= _MAX_TREES:
            raise PerfModelError(f"{where}.trees: expected a list of 1 to {_MAX_TREES} trees")
        for i, tree in enumerate(trees):
            _validate_tree(f"{where}.trees[{i}]", tree, len(expected))
