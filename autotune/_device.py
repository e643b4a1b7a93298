"""The device a command runs on: the one asked for, else the first CUDA device or the CPU."""

from __future__ import annotations

import logging

import torch

from kernels.devices import DeviceUnavailableError, normalize_device

__all__ = ["DeviceError", "resolve_device"]

logger = logging.getLogger("autotune")


class DeviceError(RuntimeError):
    """The asked device does not exist here."""


def resolve_device(device: torch.device | str | None, *, purpose: str = "tuning") -> torch.device:
    """``device`` checked and normalized (:func:`kernels.devices.normalize_device`), or the first
    CUDA device, else the CPU (with a notice).

    Args:
        device: ``"cuda:0"``, ``"cpu"``, a torch.device, or None to pick.
        purpose: What the notice says runs on the CPU when none is asked and CUDA is absent.

    Raises:
        DeviceError: ``device`` names a CUDA device this machine does not have.
        ValueError: ``device`` is not a cuda or cpu device name.
    """
    if device is None:
        if torch.cuda.is_available():
            return normalize_device("cuda")
        logger.warning("no CUDA device found: %s on the CPU (pass --device to choose)", purpose)
        return torch.device("cpu")
    try:
        device = normalize_device(device)
    except DeviceUnavailableError as exc:
        raise DeviceError(str(exc)) from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected a cuda or cpu device, got {device}")
    return device
