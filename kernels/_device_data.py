"""What a selection reads for one device: its own tables and performance model, or, where it
has none, the nearest measured device's standing in (:mod:`kernels.transfer`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ._lookup import transferred_tables, warn_once
from ._spec import RopeSpec
from .perf_model import PerfModel, find_model, find_transferred_model
from .transfer import DeviceTraits, TransferChoice

__all__ = ["DeviceData", "device_data"]

logger = logging.getLogger("kernels.selector")  # the selector's log, where users look for it


@dataclass(frozen=True)
class DeviceData:
    """What a selection reads: tables and model (this device's, or another's standing in),
    and where another device's data stands in."""

    tables: list[tuple[Path, dict]]
    model: PerfModel | None
    table_from: TransferChoice | None = None  # whose tables stand in; None: this device's own
    refused: str | None = None  # why nothing transferred to a GPU without data of its own

    @property
    def table_note(self) -> str | None:
        """What a transferred table's routes say, else None."""
        if self.table_from is None:
            return None
        return f"table of {self.table_from.device.name} transferred: {self.table_from.why}"

    def looked_in(self, file_name: str) -> str:
        """Where a spec's entries were looked for, for a ``why``."""
        if self.table_from is None:
            return f"any {file_name}"
        return f"any {file_name} or {self.table_from.device.name}'s table"


def device_data(
    table_dir: str | Path | None,
    this: DeviceTraits,
    device: torch.device,
    file_name: str,
    tables: list[tuple[Path, dict]],
    use_transfer: bool,
    spec: RopeSpec,
) -> DeviceData:
    """This device's ``tables`` and model for ``spec``; with ``use_transfer``, the nearest
    device's standing in for what it lacks (:mod:`kernels.transfer`): the tables when it has
    neither tables nor a model, the model when it has none or when its own was fit on no shape
    like ``spec`` and another device's was (:meth:`PerfModel.uncovered`: its trees would
    extrapolate). Warns once when this device has no table and another device's data is
    used."""
    model = find_model(table_dir, device)
    if not use_transfer or this.capability is None:
        return DeviceData(tables, model)
    if model is not None and model.uncovered(spec):
        covering, _ = find_transferred_model(table_dir, this, covering=spec)
        if covering is not None:
            logger.info("select_rope %s on %s: %s", spec.key, this.name, covering.transfer)
            return DeviceData(tables, covering)
    own_tables, own_model = bool(tables), model is not None
    table_from = model_from = None
    refused = []
    if not own_tables and not own_model:
        tables, choice = transferred_tables(table_dir, this)
        table_from = choice if tables else None
        refused.append(choice.why)
    if not own_model:
        model, choice = find_transferred_model(table_dir, this)
        model_from = choice if model is not None else None
        refused.append(choice.why)
    used = [(what, c) for what, c in (("table", table_from), ("model", model_from)) if c]
    if used and not own_tables:
        names = {c.device.name for _, c in used}
        what = (
            f"the {' and '.join(w for w, _ in used)} of {names.pop()}"
            if len(names) == 1
            else " and ".join(f"the {w} of {c.device.name}" for w, c in used)
        )
        warn_once(
            ("transfer", this.name, what),
            f"rope-autotune: no tuning table for {this.name} (looked for {file_name}); using "
            f"{what} ({used[0][1].why}). Tune this device in one command: "
            f"python -m autotune --device {device}",
            stacklevel=3,
        )
    elif used:
        logger.info("select_rope on %s: %s", this.name, model.transfer)
    no_data = not tables and model is None
    return DeviceData(tables, model, table_from, refused[0] if no_data and refused else None)
