"""Ctrl-C (or SIGTERM) during an in-process tuning run: finish the trial in flight, then stop."""

import logging
import os
import signal

import pytest

from autotune.stop import StopAfterTrial


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_first_signal_waits_for_the_trial_second_stops_at_once(sig):
    before = signal.getsignal(sig)
    with StopAfterTrial() as stop:
        os.kill(os.getpid(), sig)  # delivered here: the handler only records it
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.after_trial(None, None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before


def test_a_handler_replaced_mid_run_is_installed_again(caplog):
    # A provider library loaded by its first trial may install its own handler; the default
    # one would end the run on Ctrl-C without writing the table.
    before = signal.getsignal(signal.SIGINT)
    theirs = []
    with StopAfterTrial() as stop:
        signal.signal(signal.SIGINT, lambda *_: theirs.append(1))  # (SIG_DFL would kill)
        with caplog.at_level(logging.WARNING, logger="autotune.tune"):
            stop.after_trial(None, None)
        assert "SIGINT: a library replaced" in caplog.text
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and not theirs
    assert signal.getsignal(signal.SIGINT) is before


def test_disabled_leaves_the_handlers_alone():
    before = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    with StopAfterTrial(enabled=False) as stop:
        assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == before
        stop.after_trial(None, None)  # nothing requested: no interrupt
