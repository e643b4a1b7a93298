"""A performance model of the RoPE providers on one device, shipped as data beside the table.

For any spec and token count it predicts the time of each Triton config and of each vendor
provider (``torch``, ``torch_compile``, ``flashinfer``, ``vllm``) from features that carry
across shapes (bytes moved, programs and waves over the SMs, serial head-block steps, elements
per thread, warps, stages, rotated bytes per row...) rather than from spec identities. Each
provider's model is a sum of regression trees predicting ``log(time in us)`` (gradient boosting,
fit offline by :mod:`autotune.perf_model_fit`); it is evaluated here with torch on the CPU, no
fitting library needed, once per selection, never per call.

File (``NVIDIA H200`` -> ``NVIDIA_H200.model.json``, beside the table)::

    {
      "schema_version": 1,
      "features_version": 2,
      "metadata": {"device_name": "NVIDIA H200", "sm_count": 132, ...},   # as in tables
      "providers": {
        "triton": {
          "features": ["log_traffic", "log_tokens", ...],   # feature_names("triton"), in order
          "base": 1.9, "learning_rate": 0.1,
          "trees": [{"feature": [3, -1, ...], "threshold": [...], "left": [1, -1, ...],
                     "right": [2, -1, ...], "value": [...]}, ...]
        },
        "vllm": {...}, ...
      },
      "fit": {...}                                  # free-form: rows, specs, residuals
    }

A tree's node ``i`` is a leaf when ``left[i] == -1`` (its ``value`` is added); otherwise a call
goes to ``left[i]`` when ``float32(x[feature[i]]) <= float32(threshold[i])``, else to ``right[i]``
(features and thresholds compared as float32, as the fitting library does); children
come after their parent. The prediction is ``exp(base + learning_rate * sum of leaf values)``.
``features`` must equal this module's names for that provider under ``features_version`` (a
changed definition bumps it, and an older file is refused rather than misread).
:meth:`PerfModel.load` warns with ``RopeTableWarning`` and returns None for a file that is
missing, unreadable or off the schema: callers fall back to the table's rules.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from ._spec import RopeSpec
from .perf_features import (
    FEATURES_VERSION,
    TRITON,
    feature_names,
    features,
    triton_candidates,
    triton_space,
)

__all__ = [
    "FEATURES_VERSION",
    "SCHEMA_VERSION",
    "TRITON",
    "PerfModel",
    "PerfModelError",
    "Prediction",
    "choose_between_buckets",
    "feature_names",
    "features",
    "model_file_name",
    "triton_candidates",
    "validate_model",
]

SCHEMA_VERSION = 1

# -- imports from modules that may move ------------------------------------------------------


def _warning_class() -> type[Warning]:
    from . import RopeTableWarning  # at call time: the package is initialised by then

    return RopeTableWarning


# -- the file ----------------------------------------------------------------------------------

# A file is read by serving processes: bound what it may ask them to allocate.
_MAX_TREES = 2000
_MAX_NODES = 1 << 12
_TREE_FIELDS = ("feature", "threshold", "left", "right", "value")
_MAX_RANKINGS = 256


class PerfModelError(ValueError):
    """A model file that cannot be used; the message names the fault."""


def model_file_name(device_name: str) -> str:
    """``NVIDIA H200`` -> ``NVIDIA_H200.model.json`` (the table's name, ``.model`` added)."""
    from .table import device_table_name

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


# -- evaluation --------------------------------------------------------------------------------


class _Forest:
    """One provider's trees packed into padded tensors, evaluated for many rows at once."""

    def __init__(self, part: Mapping[str, Any]) -> None:
        trees = part["trees"]
        width = max(len(t["left"]) for t in trees)

        def pack(field: str, dtype: torch.dtype, pad: float) -> torch.Tensor:
            return torch.tensor(
                [t[field] + [pad] * (width - len(t[field])) for t in trees], dtype=dtype
            )

        # Flat [trees * width] arrays; a node of tree t is at t * width + node (torch.take).
        self.offset = torch.arange(len(trees), dtype=torch.int64) * width
        self.feature = pack("feature", torch.int64, 0).clamp_(min=0).flatten()
        self.threshold = pack("threshold", torch.float32, 0.0).flatten()
        self.left = pack("left", torch.int64, -1).flatten()
        self.right = pack("right", torch.int64, -1).flatten()
        self.value = pack("value", torch.float64, 0.0).flatten()
        self.base = float(part["base"])
        self.learning_rate = float(part["learning_rate"])
        self.depth = self._depth(trees)

    @staticmethod
    def _depth(trees: Sequence[Mapping[str, list]]) -> int:
        deepest = 0
        for tree in trees:
            depth = [0] * len(tree["left"])
            for i, (left, right) in enumerate(zip(tree["left"], tree["right"], strict=True)):
                if left != -1:
                    depth[left] = depth[right] = depth[i] + 1
            deepest = max(deepest, *depth)
        return deepest

    def log_us(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[rows, features]`` float64; returns ``[rows]`` predicted log(us)."""
        # Thresholds were chosen on float32 features: compare the same rounded values.
        x = x.to(torch.float32)
        at = self.offset.expand(x.shape[0], -1).clone()  # every tree's root, per row
        for _ in range(self.depth):
            go_left = x.gather(1, self.feature.take(at)) <= self.threshold.take(at)
            child = torch.where(go_left, self.left.take(at), self.right.take(at))
            at = torch.where(child == -1, at, child + self.offset)
        return self.base + self.learning_rate * self.value.take(at).sum(dim=1)


@dataclass(frozen=True)
class Prediction:
    """A predicted choice: provider, its config (None for vendor providers), time in us."""

    provider: str
    config: Mapping[str, Any] | None
    predicted_us: float


class PerfModel:
    """Predicted RoPE times on one device, from a validated model file's content.

    Deterministic: the same file, spec, tokens and config give the same float on every run
    (float64 on the CPU, a fixed summation order).
    """

    def __init__(self, data: Mapping[str, Any], source: Path | None = None) -> None:
        """Raises ``PerfModelError`` when ``data`` is off the schema."""
        validate_model(data)
        self.source = source
        self.metadata: Mapping[str, Any] = data["metadata"]
        self.sm_count: int = self.metadata.get("sm_count") or 1
        self._forests = {name: _Forest(part) for name, part in data["providers"].items()}
        self._candidates: dict[RopeSpec, list[dict[str, int]]] = {}
        # Rankings asked again (a selector's buckets, the tuner's studies): bounded memo.
        self._ranked: dict[tuple[RopeSpec, int], list[int]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> PerfModel | None:
        """The model in ``path``, or None with one ``RopeTableWarning`` naming the file and the
        fault (missing, unreadable, not JSON, off the schema). Never raises."""
        path = Path(path)
        try:
            data = orjson.loads(path.read_bytes())
            return cls(data, source=path)
        except (OSError, orjson.JSONDecodeError, PerfModelError) as exc:
            warnings.warn(
                f"performance model {path} not used: {exc}", _warning_class(), stacklevel=2
            )
            return None

    @property
    def providers(self) -> tuple[str, ...]:
        """Providers the model predicts, sorted."""
        return tuple(sorted(self._forests))

    def _predict(
        self,
        provider: str,
        spec: RopeSpec,
        tokens: int,
        configs: Sequence[Mapping[str, Any] | None],
    ) -> list[float]:
        if tokens < 1:
            raise ValueError(f"tokens: expected at least 1, got {tokens}")
        if provider == TRITON and any(c is None for c in configs):
            raise ValueError("config: the triton provider's time depends on its config")
        forest = self._forests[provider]
        x = torch.tensor(
            [features(provider, spec, tokens, c, sm_count=self.sm_count) for c in configs],
            dtype=torch.float64,
        )
        return forest.log_us(x).exp().tolist()

    def predict_us(
        self,
        provider: str,
        spec: RopeSpec,
        tokens: int,
        config: Mapping[str, Any] | None = None,
    ) -> float:
        """Predicted time of one call in microseconds.

        Raises:
            KeyError: the model has no part for ``provider``.
            ValueError: ``tokens`` below 1, or a Triton prediction without a config.
        """
        return self._predict(provider, spec, tokens, [config])[0]

    def candidates(self, spec: RopeSpec) -> list[dict[str, int]]:
        """The valid Triton configs for ``spec`` (cached per spec)."""
        if spec not in self._candidates:
            self._candidates[spec] = triton_candidates(spec)
        return self._candidates[spec]

    def predict_triton_configs(
        self, spec: RopeSpec, tokens: int, configs: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        """Predicted times (us) of ``configs`` for ``spec`` at ``tokens``, in their order."""
        return self._predict(TRITON, spec, tokens, list(configs)) if configs else []

    def rank_triton_configs(
        self, spec: RopeSpec, tokens: int, k: int | None = None
    ) -> list[dict[str, int]]:
        """The ``k`` valid Triton configs predicted fastest for ``spec`` at ``tokens``, fastest
        first (ties in the parameter space's order); every valid config when ``k`` is None.

        Raises:
            KeyError: the model has no Triton part.
        """
        configs = self.candidates(spec)
        order = self._ranked.get((spec, tokens))
        if order is None:
            times = self.predict_triton_configs(spec, tokens, configs)
            order = sorted(range(len(configs)), key=lambda i: (times[i], i))
            if len(self._ranked) >= _MAX_RANKINGS:
                self._ranked.pop(next(iter(self._ranked)))
            self._ranked[(spec, tokens)] = order
        return [dict(configs[i]) for i in order[:k]]

    def best(self, spec: RopeSpec, tokens: int, providers: Iterable[str]) -> Prediction | None:
        """The predicted fastest of ``providers`` (the caller passes those available here and
        supporting the call), with Triton's best predicted config; None when the model knows
        none of them. Ties go to the provider name first in sorted order."""
        best: Prediction | None = None
        for name in sorted(set(providers)):
            if name not in self._forests:
                continue
            if name == TRITON:
                ranked = self.rank_triton_configs(spec, tokens, 1)
                if not ranked:
                    continue
                config: dict[str, int] | None = ranked[0]
            else:
                config = None
            us = self.predict_us(name, spec, tokens, config)
            if best is None or us < best.predicted_us:
                best = Prediction(name, config, us)
        return best


def choose_between_buckets(
    model: PerfModel,
    spec: RopeSpec,
    tokens: int,
    neighbours: Iterable[tuple[str, Mapping[str, Any] | None]],
    providers: Iterable[str],
    *,
    margin: float = 1.1,
) -> Prediction | None:
    """The choice for a token count between two of a tuned spec's buckets.

    Candidates: the measured winners ``(provider, config)`` of the neighbouring tuned buckets,
    and the model's own best pick; each is predicted at ``tokens`` and the fastest wins. The
    model's own pick must be predicted faster than the best neighbour by ``margin`` (the
    neighbours' winners are measured; the model's pick is not; the default is the margin that
    did best in ``benchmarks/perf_model_loso.py``). Providers outside
    ``providers`` (unavailable or unsupporting) and Triton configs invalid for ``spec`` are
    skipped. None when nothing is left.
    """
    allowed = set(providers) & set(model.providers)
    _, config_problems, _ = triton_space()
    scored: list[tuple[float, int, Prediction]] = []
    for order, (name, config) in enumerate(neighbours):
        if name not in allowed or (
            name == TRITON and (not config or config_problems(spec, config))
        ):
            continue
        us = model.predict_us(name, spec, tokens, config if name == TRITON else None)
        scored.append((us, order, Prediction(name, dict(config) if config else None, us)))
    own = model.best(spec, tokens, allowed)
    if not scored:
        return own
    best = min(scored, key=lambda item: item[:2])[2]
    if own is not None and own.predicted_us * margin < best.predicted_us:
        return own
    return best
