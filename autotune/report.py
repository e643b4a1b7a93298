"""Reports of a tuning run: a text summary of a table, and every measurement as CSV."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna
import orjson
from optuna.trial import TrialState

from kernels.table import spec_entries

from .outcome import TrialOutcome

__all__ = ["format_summary", "write_measurements_csv"]


def format_summary(table: Mapping[str, Any]) -> str:
    """Per timing mode and spec: each bucket's winner, its median, and its speedup over the
    best time of every provider measured (``1.00x`` for the winner itself)."""
    lines = []
    for timing, specs in sorted(table["entries"].items()):
        for spec_key in sorted(specs):
            entries = spec_entries(table, timing, spec_key)
            names = sorted({p for e in entries.values() for p in e.providers_us})
            lines.append(f"{timing}  {spec_key}")
            header = f"  {'tokens':>7}  {'winner':<14}{'median_us':>10}   speedup over: "
            lines.append(header + "  ".join(f"{n:>13}" for n in names))
            for bucket, entry in entries.items():
                cells = []
                for name in names:
                    other = entry.providers_us.get(name)
                    cells.append(f"{other / entry.median_us:>12.2f}x" if other else f"{'-':>13}")
                lines.append(
                    f"  {bucket:>7}  {entry.provider:<14}{entry.median_us:>10.2f}   "
                    f"{'':14}" + "  ".join(cells)
                )
    return "\n".join(lines) if lines else "no finished study"


_CSV_FIELDS = (
    "study",
    "device_name",
    "timing",
    "spec",
    "tokens",
    "trial",
    "state",
    "outcome",
    "provider",
    "config",
    "median_us",
    "p20_us",
    "p80_us",
    "error",
    "started",
    "finished",
)


def write_measurements_csv(
    storage: optuna.storages.BaseStorage, study_names: Iterable[str], path: str | os.PathLike
) -> Path:
    """Every finished trial of ``study_names`` as one CSV row (``config`` as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for name in study_names:
            try:
                study_id = storage.get_study_id_from_name(name)
            except KeyError:
                continue
            attrs = storage.get_study_user_attrs(study_id)
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                if trial.state in (TrialState.WAITING, TrialState.RUNNING):
                    continue
                user = trial.user_attrs
                outcome = TrialOutcome.of(trial)
                writer.writerow(
                    {
                        "study": name,
                        "device_name": attrs.get("device_name"),
                        "timing": attrs.get("timing"),
                        "spec": attrs.get("spec"),
                        "tokens": attrs.get("tokens"),
                        "trial": trial.number,
                        "state": trial.state.name,
                        "outcome": outcome.kind.value if outcome else "",
                        "provider": user.get("provider", ""),
                        "config": orjson.dumps(user.get("config") or {}).decode(),
                        "median_us": user.get("median_us", ""),
                        "p20_us": user.get("p20_us", ""),
                        "p80_us": user.get("p80_us", ""),
                        "error": outcome.reason if outcome else "",
                        "started": trial.datetime_start or "",
                        "finished": trial.datetime_complete or "",
                    }
                )
    return path
