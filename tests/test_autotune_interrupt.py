"""Ctrl-C during an in-process tuning run: finish the trial in flight, then stop."""

import os
import signal

import pytest

from autotune.tune import _StopAfterTrial


def test_first_sigint_waits_for_the_trial_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with _StopAfterTrial() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # delivered here: the handler only records it
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.after_trial(None, None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_disabled_leaves_sigint_alone():
    before = signal.getsignal(signal.SIGINT)
    with _StopAfterTrial(enabled=False) as stop:
        assert signal.getsignal(signal.SIGINT) is before
        stop.after_trial(None, None)  # nothing requested: no interrupt
