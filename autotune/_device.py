"""The device a command runs on: the one asked for, else the first CUDA device or the CPU."""

from __future__ import annotations

import logging

import torch

__all__ = ["DeviceError", "resolve_device"]

logger = logging.getLogger("autotune")


class DeviceError(RuntimeError):
    """The asked device does not exist here."""


def resolve_device(device: torch.device | str | None, *, purpose: str = "tuning") -> torch.device:
    """``device`` checked, or the first CUDA device, else the CPU (with a notice).

    Args:
        device: ``"cuda:0"``, ``"cpu"``, a torch.device, or None to pick.
        purpose: What the notice says runs on the CPU when none is asked and CUDA is absent.

    Raises:
        DeviceError: ``device`` names a CUDA device this machine does not have.
        ValueError: ``device`` is not a cuda or cpu device name.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        logger.warning("no CUDA device found: %s on the CPU (pass --device to choose)", purpose)
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: expected e.g. cuda:0 or cpu, got {device!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {device} was asked for, but CUDA is not available here")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device: {device} was asked for, but there are only "
                f"{torch.cuda.device_count()} CUDA devices"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device: expected a cuda or cpu device, got {device}")
    return device
