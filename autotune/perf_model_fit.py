"""Fit the performance model (:mod:`kernels.perf_model`) on what the tuner measured.

Reads the measured trials of an Optuna storage (the tuner's journal or database), one row per
distinct (timing, spec, bucket, provider, config) with the median of its timings, and fits each
provider's log-time model with scikit-learn's ``GradientBoostingRegressor`` (well kept, exact
and seeded, and its trees are public arrays that export to the model file; the runtime
evaluates them with torch, without scikit-learn). Trees were chosen over a linear log-time
model on the same features by leave-one-shape-out (``benchmarks/perf_model_loso.py``; why:
``docs/DESIGN.md#model-trees``).

Command line::

    python -m autotune.perf_model_fit --storage studies.journal --output configs
    python -m autotune.perf_model_fit --rows rows.csv --output configs   # from a rows cache
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from kernels import RopeSpec
from kernels.perf_model import (
    FEATURES_VERSION,
    SCHEMA_VERSION,
    PerfModel,
    feature_names,
    features,
    model_file_name,
    validate_model,
)
from kernels.providers import TRITON
from kernels.table import TIMING_MODES, write_atomically

from ._preflight import check_output_dir
from .cli_args import OneLineParser, add_logging_flags, logging_from_args
from .storage import open_storage
from .studies import StudyKey, measured_trials

__all__ = [
    "Measurement",
    "fit_model",
    "measurements_from_storage",
    "read_rows",
    "write_model",
    "write_rows",
]

logger = logging.getLogger(__name__)

# Gradient boosting settings, chosen by leave-one-shape-out (benchmarks/perf_model_loso.py;
# docs/DESIGN.md#model-trees); a fixed seed, so that a refit on the same rows writes the same
# trees.
GBT_PARAMS: dict[str, Any] = {
    "n_estimators": 200,
    "max_depth": 7,
    "learning_rate": 0.1,
    "subsample": 0.8,
    "random_state": 0,
}
# The vendor providers have one row per bucket (about 500) and no config: smaller trees.
VENDOR_GBT_PARAMS: dict[str, Any] = {**GBT_PARAMS, "n_estimators": 100, "max_depth": 3}


@dataclass(frozen=True)
class Measurement:
    """One measured (spec, bucket, provider, config) and its median time in us.

    ``measured_at`` is when it was first measured (ISO 8601, empty when unknown): the order in
    which a study's sampler found it.
    """

    spec_key: str
    tokens: int
    provider: str
    config: Mapping[str, Any] | None
    median_us: float
    measured_at: str = ""

    @property
    def spec(self) -> RopeSpec:
        return RopeSpec.from_key(self.spec_key)


# -- reading the storage -----------------------------------------------------------------------


def measurements_from_storage(
    storage: Any, *, timing: str = "graph", device_name: str | None = None
) -> tuple[list[Measurement], dict[str, Any]]:
    """Distinct measurements of ``storage``'s studies at the providers' current revisions.

    A study started from another holds copies of its trials; copies and repeats of one
    (spec, bucket, provider, config) become one row with the median of the distinct timings.
    Multimodal (mRoPE) specs are left out: the features do not describe their layout, so
    their rows would read as slower plain-RoPE calls (the selector uses no model for them).

    Returns:
        The rows sorted by (spec, tokens, provider, config), and the newest study metadata
        (the table's header) of the device.
    """
    from optuna.trial import TrialState

    times: dict[tuple[str, int, str, str], set[float]] = defaultdict(set)
    first: dict[tuple[str, int, str, str], str] = {}
    metadata: dict[str, Any] = {}
    for study in storage.get_all_studies():
        attrs = study.user_attrs
        key = StudyKey.from_attrs(attrs)
        if key is None or key.timing != timing or key.stale():
            continue
        if device_name is not None and key.device_name != device_name:
            continue
        if key.spec.is_mrope:
            continue
        meta = attrs.get("metadata") or {}
        if meta.get("updated", "") >= metadata.get("updated", ""):
            metadata = dict(meta)
        for trial in measured_trials(
            storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        ):
            user = trial.user_attrs
            if user.get("provider") == TRITON and not user.get("config"):
                continue
            median = user.get("median_us", trial.value)
            if median is None or not math.isfinite(median) or median <= 0:
                continue
            config = json.dumps(user.get("config") or None, sort_keys=True)
            row = (attrs["spec"], int(attrs["tokens"]), user["provider"], config)
            times[row].add(median)
            # A copied trial (a study started from another) keeps its user attributes but is
            # completed later: the earliest completion is the original measurement.
            done = trial.datetime_complete.isoformat() if trial.datetime_complete else ""
            if done and (row not in first or done < first[row]):
                first[row] = done
    rows = [
        Measurement(
            spec,
            tokens,
            provider,
            json.loads(config),
            statistics.median(sorted(v)),
            first.get((spec, tokens, provider, config), ""),
        )
        for (spec, tokens, provider, config), v in sorted(times.items())
    ]
    return rows, metadata


def write_rows(path: str | os.PathLike, rows: Iterable[Measurement]) -> None:
    """A compact CSV cache of ``rows`` (loading a large journal takes a while)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["spec", "tokens", "provider", "config", "median_us", "measured_at"])
        for r in rows:
            config = json.dumps(r.config, sort_keys=True) if r.config else ""
            out.writerow(
                [r.spec_key, r.tokens, r.provider, config, repr(r.median_us), r.measured_at]
            )


def read_rows(path: str | os.PathLike) -> list[Measurement]:
    """Rows written by :func:`write_rows`."""
    with open(path, newline="") as f:
        return [
            Measurement(
                r["spec"],
                int(r["tokens"]),
                r["provider"],
                json.loads(r["config"]) if r["config"] else None,
                float(r["median_us"]),
                r.get("measured_at") or "",
            )
            for r in csv.DictReader(f)
        ]


# -- fitting -----------------------------------------------------------------------------------


def _threshold(value: float) -> float:
    """The largest float32 at or below ``value``, as its shortest decimal: for float32
    features ``x <= value`` and ``x <= result`` agree, and the file stays small."""
    t = np.float32(value)
    if float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(np.format_float_positional(t, unique=True, trim="-"))


def _export_forest(gbt: Any) -> dict[str, Any]:
    """A fitted ``GradientBoostingRegressor`` as the model file's trees (its public
    ``init_`` and ``estimators_[i, 0].tree_`` arrays); leaf values to 7 significant digits."""
    trees = []
    for estimator in gbt.estimators_[:, 0]:
        tree = estimator.tree_
        leaf = tree.children_left == -1
        trees.append(
            {
                "feature": [
                    -1 if is_leaf else int(f) for f, is_leaf in zip(tree.feature, leaf, strict=True)
                ],
                "threshold": [
                    0.0 if is_leaf else _threshold(t)
                    for t, is_leaf in zip(tree.threshold, leaf, strict=True)
                ],
                "left": [int(v) for v in tree.children_left],
                "right": [int(v) for v in tree.children_right],
                "value": [float(f"{v:.7g}") for v in tree.value[:, 0, 0]],
            }
        )
    return {
        "base": float(np.ravel(gbt.init_.constant_)[0]),
        "learning_rate": float(gbt.learning_rate),
        "trees": trees,
    }


def fit_model(rows: Sequence[Measurement], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Fit every provider with rows in ``rows``; returns the model file's content (validated).

    Args:
        metadata: The table header of the device measured (``device_name``, ``sm_count``...).
    """
    from sklearn import __version__ as sklearn_version  # the tune extra; fitting only
    from sklearn.ensemble import GradientBoostingRegressor

    sm_count = metadata.get("sm_count") or 1
    by_provider: dict[str, list[Measurement]] = defaultdict(list)
    for r in rows:
        by_provider[r.provider].append(r)
    providers, fit_info = {}, {}
    for name, part in sorted(by_provider.items()):
        x = np.array([features(name, r.spec, r.tokens, r.config, sm_count=sm_count) for r in part])
        y = np.log([r.median_us for r in part])
        params = GBT_PARAMS if name == TRITON else VENDOR_GBT_PARAMS
        gbt = GradientBoostingRegressor(**params).fit(x, y)
        residual = y - gbt.predict(x)
        providers[name] = {"features": list(feature_names(name)), **_export_forest(gbt)}
        fit_info[name] = {
            "rows": len(part),
            "rms_log_error": float(np.sqrt(np.mean(residual**2))),
        }
    model = {
        "schema_version": SCHEMA_VERSION,
        "features_version": FEATURES_VERSION,
        "metadata": dict(metadata),  # as the table's: "updated" is the newest measurement
        "providers": providers,
        "fit": {
            "fitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "library": f"scikit-learn {sklearn_version} GradientBoostingRegressor",
            "specs": sorted({r.spec_key for r in rows}),
            "buckets": sorted({r.tokens for r in rows}),
            "providers": fit_info,
        },
    }
    validate_model(model)
    return model


def _dumps(value: Any, indent: int = 0) -> bytes:
    """JSON with sorted keys, objects one key per line down to the trees, each tree on one line."""
    if isinstance(value, dict) and "left" not in value:
        pad = b"\n" + b"  " * (indent + 1)
        items = [
            pad + orjson.dumps(k) + b": " + _dumps(v, indent + 1) for k, v in sorted(value.items())
        ]
        return b"{" + b",".join(items) + b"\n" + b"  " * indent + b"}" if items else b"{}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        pad = b"\n" + b"  " * (indent + 1)
        items = [pad + _dumps(v, indent + 1) for v in value]
        return b"[" + b",".join(items) + b"\n" + b"  " * indent + b"]"
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def write_model(path: str | os.PathLike, model: Mapping[str, Any]) -> Path:
    """Validate ``model`` and write it atomically (:func:`kernels.table.write_atomically`)."""
    validate_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One line per tree (the bulk of the file): readable diffs, a third of an indented size.
    return write_atomically(path, _dumps(model) + b"\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m autotune.perf_model_fit`` parser."""
    parser = OneLineParser(
        prog="python -m autotune.perf_model_fit",
        description="Fit the performance model on the tuner's measurements into --output.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--storage",
        metavar="URL",
        help="the tuner's Optuna storage, e.g. --storage studies.journal",
    )
    source.add_argument(
        "--rows", metavar="FILE", help="a rows CSV written by --save-rows, e.g. --rows rows.csv"
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory for <device>.model.json, e.g. --output configs",
    )
    parser.add_argument(
        "--timing",
        default="graph",
        choices=TIMING_MODES,
        help="the timing mode whose measurements are fitted, e.g. --timing eager (default: graph)",
    )
    parser.add_argument(
        "--save-rows",
        metavar="FILE",
        help="also write the extracted rows to this CSV, e.g. --save-rows rows.csv",
    )
    parser.add_argument(
        "--metadata-from",
        metavar="TABLE",
        help="the table whose metadata header (device, SM count) the model gets, e.g. "
        "--metadata-from configs/NVIDIA_H200.json (default: the storage's)",
    )
    add_logging_flags(parser, quiet="no fit summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 written, 2 bad arguments, an unreadable
    source, or nothing to fit (one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging_from_args(parser, args)
    metadata: dict[str, Any] = {}
    try:
        output = check_output_dir(args.output, "--output")
        if args.storage:
            rows, metadata = measurements_from_storage(
                open_storage(args.storage, create=False), timing=args.timing
            )
        else:
            rows = read_rows(args.rows)
        if args.metadata_from:
            metadata = orjson.loads(Path(args.metadata_from).read_bytes()).get("metadata") or {}
    except (OSError, ValueError) as exc:  # orjson's JSONDecodeError is a ValueError
        parser.error(str(exc))
    if args.save_rows:
        write_rows(args.save_rows, rows)
    if not rows or "device_name" not in metadata:
        parser.error("no measurements, or no device metadata (pass --metadata-from TABLE)")
    model = fit_model(rows, metadata)
    path = write_model(output / model_file_name(metadata["device_name"]), model)
    assert PerfModel(model) is not None
    if not args.quiet:
        for name, info in model["fit"]["providers"].items():
            print(f"{name}: {info['rows']} rows, rms log error {info['rms_log_error']:.3f}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
