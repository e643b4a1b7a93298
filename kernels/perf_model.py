"""A performance model of the RoPE providers on one device, shipped as data beside the table.

For any spec and token count it predicts the time of each config of a tunable provider and of
each untunable provider from features that carry across shapes (bytes moved, programs and waves
over the SMs, serial head-block steps, elements per thread, warps, stages, rotated bytes per
row...) rather than from spec identities; each provider names and computes its own
(:meth:`kernels.providers.Provider.features`). Each provider's model is a sum of regression
trees predicting ``log(time in us)`` (gradient boosting, fit offline by
:mod:`autotune.perf_model_fit`); it is evaluated here with torch on the CPU, no fitting library
needed, once per selection, never per call. :func:`find_model` finds a device's model file;
:func:`find_transferred_model`, for a GPU without one, the nearest device's
(:mod:`kernels.transfer`).

The file (``NVIDIA H200`` -> ``NVIDIA_H200.model.json``, beside the table) and its validation
are :mod:`kernels._perf_model_format`'s; :meth:`PerfModel.load` warns with
``RopeTableWarning`` and returns None for a file that is missing, unreadable or off the schema:
callers fall back to the table's rules.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from . import table as _table  # module attributes: tests redirect the search path
from ._lookup import device_files, device_name, device_traits, search_directories
from ._perf_model_format import (
    SCHEMA_VERSION,
    PerfModelError,
    described,
    feature_names,
    features,
    model_file_name,
    validate_model,
)
from ._spec import RopeSpec
from .perf_features import CALL_FEATURES, FEATURES_VERSION, call_features
from .table import RopeTableWarning
from .transfer import DeviceTraits, TransferChoice, choose_device

__all__ = [
    "FEATURES_VERSION",
    "SCHEMA_VERSION",
    "PerfModel",
    "PerfModelError",
    "Prediction",
    "choose_between_buckets",
    "feature_names",
    "features",
    "find_model",
    "find_transferred_model",
    "model_file_name",
    "validate_model",
]

# Rankings a model keeps (a selector's buckets, the tuner's studies).
_MAX_RANKINGS = 256
# The call features a spec alone decides (not its token count): what "shapes like it" means.
_SPEC_FEATURES = frozenset(CALL_FEATURES) - {"log_traffic", "log_tokens"}

# Loaded models by (path, modification time, size): a serving stack builds many selectors.
_models: dict[tuple[str, int, int], PerfModel | None] = {}
_models_lock = threading.Lock()


def _load_shared(path: Path) -> tuple[tuple[str, int, int], PerfModel | None]:
    """The file version's key and the model in ``path`` (None: missing, or unusable and
    warned once per file version)."""
    try:
        stat = path.stat()
    except OSError:
        return (str(path), 0, 0), None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _models_lock:
        if key not in _models:
            _models[key] = PerfModel.load(path)
        return key, _models[key]


def find_model(
    table_dir: str | os.PathLike | None, device: torch.device, *, transfer: bool = False
) -> PerfModel | None:
    """The device's own model: beside ``table_dir``'s table (or in that directory), else the
    first model file of the search path (:func:`kernels.table.table_search_path`); with
    ``transfer``, else the nearest device's (:func:`find_transferred_model`); None when there is
    none or it cannot be used (warned once per file version). Loaded models are shared."""
    name = model_file_name(device_name(device))
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        paths = [path.parent / name if path.suffix == ".json" else path / name]
    else:
        paths = [directory / name for directory in _table.table_search_path()]
    for path in paths:
        _, model = _load_shared(path)
        if model is not None:
            return model
    if transfer:
        return find_transferred_model(table_dir, device_traits(device))[0]
    return None


# Transferred models by (file version, SM count, why): selections repeat, and rankings are
# memoized on the model.
_transferred: dict[tuple[tuple[str, int, int], int | None, str], PerfModel] = {}


def find_transferred_model(
    table_dir: str | os.PathLike | None, this: DeviceTraits, *, covering: RopeSpec | None = None
) -> tuple[PerfModel | None, TransferChoice]:
    """For a device without a model of its own: the model of the nearest device
    (:func:`kernels.transfer.choose_device` over the ``*.model.json`` files of
    :func:`kernels._lookup.search_directories`), evaluated with this device's SM count, with
    :attr:`PerfModel.transfer` saying whose it is and why; None when none may transfer (the
    choice says why) or the chosen device's model files cannot be used. With ``covering``,
    only models fit on shapes like that spec are candidates (:meth:`PerfModel.uncovered`)."""
    if this.capability is None:  # nothing may transfer: no need to look
        return None, choose_device(this, ())
    files = device_files(search_directories(table_dir), "model")
    if covering is not None:
        files = [(p, traits) for p, traits in files if _covers(_load_shared(p)[1], covering)]
    choice = choose_device(this, (traits for _, traits in files))
    if choice.device is None:
        return None, choice
    unlike = "" if covering is None else " for a shape unlike this device's model's"
    why = f"model of {choice.device.name} transferred{unlike}: {choice.why}"
    sm_count = None if this.sm_count is None else int(this.sm_count)
    for path, traits in files:
        if traits.name != choice.device.name:
            continue
        version, model = _load_shared(path)
        if model is None:
            continue
        key = (version, sm_count, why)
        with _models_lock:
            if key not in _transferred:
                _transferred[key] = model.transferred(sm_count, why)
            return _transferred[key], choice
    return None, choice


def _feature_ranges(fit: Any) -> dict[str, tuple[float, float]]:
    """Each spec feature's (low, high) over the specs a model file's ``fit`` names (keys that
    do not parse are left out: ``fit`` is free-form)."""
    ranges: dict[str, tuple[float, float]] = {}
    specs = fit.get("specs") if isinstance(fit, Mapping) else None
    for key in specs if isinstance(specs, list) else ():
        try:
            spec = RopeSpec.from_key(key)
        except (TypeError, ValueError):
            continue
        for name, value in _spec_features(spec).items():
            low, high = ranges.get(name, (value, value))
            ranges[name] = (min(low, value), max(high, value))
    return ranges


def _spec_features(spec: RopeSpec) -> dict[str, float]:
    """``spec``'s call features that its token count does not decide (:data:`_SPEC_FEATURES`)."""
    return {
        name: value
        for name, value in zip(CALL_FEATURES, call_features(spec, 1), strict=True)
        if name in _SPEC_FEATURES
    }


def _covers(model: PerfModel | None, spec: RopeSpec) -> bool:
    return model is not None and not model.uncovered(spec)


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
        # Whose model this is and why, when another device's (see transferred()).
        self.transfer: str | None = None
        self._forests = {name: _Forest(part) for name, part in data["providers"].items()}
        self._ranges = _feature_ranges(data.get("fit"))
        self._candidates: dict[tuple[str, RopeSpec], list[dict[str, Any]]] = {}
        # Rankings asked again (a selector's buckets, the tuner's studies): bounded memo.
        self._ranked: dict[tuple[str, RopeSpec, int], list[int]] = {}

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
                f"performance model {path} not used: {exc}", RopeTableWarning, stacklevel=2
            )
            return None

    def transferred(self, sm_count: int | None, why: str) -> PerfModel:
        """This model used for another device: the same trees, with that device's
        ``sm_count`` in the features (what a config does on it: programs per SM, waves; the
        model's own when None), and :attr:`transfer` set to ``why`` (said by ``explain()``)."""
        other = copy.copy(self)
        other.sm_count = sm_count or self.sm_count
        other.transfer = why
        other._ranked = {}  # rankings depend on the SM count (valid configs do not)
        return other

    @property
    def providers(self) -> tuple[str, ...]:
        """Providers the model predicts, sorted."""
        return tuple(sorted(self._forests))

    def uncovered(self, spec: RopeSpec) -> tuple[str, ...]:
        """The call features of ``spec`` (:data:`kernels.perf_features.CALL_FEATURES`, less the
        token count's) outside their range over the shapes the model was fit on: where its
        trees extrapolate. Empty when ``spec`` lies inside, or the file names no shapes."""
        return tuple(
            name
            for name, value in _spec_features(spec).items()
            if name in self._ranges
            and not self._ranges[name][0] - 1e-9 <= value <= self._ranges[name][1] + 1e-9
        )

    def _predict(
        self,
        provider: str,
        spec: RopeSpec,
        tokens: int,
        configs: Sequence[Mapping[str, Any] | None],
    ) -> list[float]:
        if tokens < 1:
            raise ValueError(f"tokens: expected at least 1, got {tokens}")
        if described(provider).tunable and any(c is None for c in configs):
            raise ValueError(f"config: the {provider} provider's time depends on its config")
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
            ValueError: ``tokens`` below 1, or a tunable provider without a config.
        """
        return self._predict(provider, spec, tokens, [config])[0]

    def candidates(self, provider: str, spec: RopeSpec) -> list[dict[str, Any]]:
        """The valid configs of ``provider`` for ``spec``
        (:meth:`~kernels.providers.Provider.candidates`, cached per provider and spec)."""
        if (provider, spec) not in self._candidates:
            self._candidates[(provider, spec)] = described(provider).candidates(spec)
        return self._candidates[(provider, spec)]

    def predict_configs(
        self, provider: str, spec: RopeSpec, tokens: int, configs: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        """Predicted times (us) of ``provider``'s ``configs`` for ``spec`` at ``tokens``, in
        their order."""
        return self._predict(provider, spec, tokens, list(configs)) if configs else []

    def rank_configs(
        self, provider: str, spec: RopeSpec, tokens: int, k: int | None = None
    ) -> list[dict[str, Any]]:
        """The ``k`` valid configs of the tunable ``provider`` predicted fastest for ``spec``
        at ``tokens``, fastest first (ties in :meth:`candidates` order); every valid config
        when ``k`` is None.

        Raises:
            KeyError: the model has no part for ``provider``.
        """
        configs = self.candidates(provider, spec)
        order = self._ranked.get((provider, spec, tokens))
        if order is None:
            times = self.predict_configs(provider, spec, tokens, configs)
            order = sorted(range(len(configs)), key=lambda i: (times[i], i))
            if len(self._ranked) >= _MAX_RANKINGS:
                self._ranked.pop(next(iter(self._ranked)))
            self._ranked[(provider, spec, tokens)] = order
        return [dict(configs[i]) for i in order[:k]]

    def best(self, spec: RopeSpec, tokens: int, providers: Iterable[str]) -> Prediction | None:
        """The predicted fastest of ``providers`` (the caller passes those available here and
        supporting the call), a tunable one with its best predicted config; None when the model
        knows none of them. Ties go to the provider name first in sorted order."""
        best: Prediction | None = None
        for name in sorted(set(providers)):
            if name not in self._forests:
                continue
            if described(name).tunable:
                ranked = self.rank_configs(name, spec, tokens, 1)
                if not ranked:
                    continue
                config: dict[str, Any] | None = ranked[0]
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
    ``providers`` (unavailable or unsupporting) and configs of tunable providers that are
    missing or break their restrictions for ``spec`` are skipped. None when nothing is left.
    """
    allowed = set(providers) & set(model.providers)
    scored: list[tuple[float, int, Prediction]] = []
    for order, (name, config) in enumerate(neighbours):
        if name not in allowed:
            continue
        tunable = described(name).tunable
        if tunable and (not config or described(name).config_problems(spec, config)):
            continue
        us = model.predict_us(name, spec, tokens, config if tunable else None)
        scored.append((us, order, Prediction(name, dict(config) if config else None, us)))
    own = model.best(spec, tokens, allowed)
    if not scored:
        return own
    best = min(scored, key=lambda item: item[:2])[2]
    if own is not None and own.predicted_us * margin < best.predicted_us:
        return own
    return best
