"""Stopping an in-process tuning run cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import optuna
from optuna.trial import FrozenTrial

__all__ = ["StopAfterTrial"]

logger = logging.getLogger(__name__)

# Signals that stop an in-process run after the trial in flight: Ctrl-C, and what a job
# scheduler or ``timeout`` sends.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopAfterTrial:
    """Stop handling for an in-process run: the first SIGINT or SIGTERM lets the trial in flight
    finish (a KeyboardInterrupt raised mid-measurement could land inside CUDA graph capture,
    leaving the CUDA context unusable), then stops through the usual KeyboardInterrupt path, so
    the finished studies are written; a second signal stops at once. Only the main thread can
    own the handlers; elsewhere nothing changes.

    The handlers are installed again after every trial: a provider's library is loaded by its
    first trial, and one that installs its own handler would otherwise turn the stop into a kill
    that writes nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopAfterTrial:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s: stopping after the trial in flight (again to stop at once)",
            signal.Signals(signum).name,
        )

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.requested:
            raise KeyboardInterrupt
        for sig in self._previous:
            current = signal.getsignal(sig)
            if current != self._on_signal:
                logger.warning(
                    "%s: a library replaced the tuner's handler with %r; installing it again",
                    sig.name,
                    current,
                )
            # Unconditionally: a handler installed from C is invisible to getsignal().
            signal.signal(sig, self._on_signal)
