"""Device names in one canonical form, so that ``"cuda"``, ``"cuda:0"`` and a tensor's
``device`` name one device: one selector cache key, one tuning table, one error message."""

from __future__ import annotations

import torch

__all__ = ["DeviceUnavailableError", "normalize_device"]


class DeviceUnavailableError(ValueError):
    """A well-formed CUDA device name that this machine does not have: CUDA is not available,
    or the index is past the device count."""


def normalize_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device`; a CUDA device always carries its index (the
    current device when none is given). Other device types are returned as parsed.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, or a :class:`torch.device`.

    Raises:
        DeviceUnavailableError: ``device`` names a CUDA device this machine does not have.
        ValueError: ``device`` is not a device name (DeviceUnavailableError is a ValueError).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected e.g. cuda:0 or cpu, got {device!r} ({exc})") from None
    if parsed.type != "cuda":
        return parsed
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device: {parsed} was asked for, but CUDA is not available here "
            "(no CUDA device or driver)"
        )
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device: {parsed} was asked for, but there are only "
            f"{torch.cuda.device_count()} CUDA devices"
        )
    return torch.device("cuda", index)
