"""Trial outcomes: written to and read from a trial's user attributes, the form of journals
written before the type included."""

import optuna
import pytest
import torch

from autotune.outcome import COUNTED_OUTCOMES, Outcome, TrialOutcome, is_transient
from autotune.studies import counted_trials, is_counted, measured_trials


def recorded(outcome: TrialOutcome, state=optuna.trial.TrialState.FAIL):
    study = optuna.create_study()
    trial = study.ask()
    outcome.record(trial)
    study.tell(trial, 1.0 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return study.trials[0]


@pytest.mark.parametrize(
    ("outcome", "attrs", "text"),
    [
        (TrialOutcome(Outcome.MEASURED), {"outcome": "measured"}, "measured"),
        (
            TrialOutcome(Outcome.WRONG, "query: max error 0.5"),
            {"outcome": "wrong", "error": "wrong result: query: max error 0.5"},
            "wrong result: query: max error 0.5",
        ),
        (
            TrialOutcome(Outcome.ERROR, "RuntimeError: boom"),
            {"outcome": "error", "error": "RuntimeError: boom"},
            "error: RuntimeError: boom",
        ),
        (
            TrialOutcome(Outcome.INVALID, "config: block_t"),
            {"outcome": "invalid", "error": "config: block_t"},
            "invalid: config: block_t",
        ),
    ],
)
def test_an_outcome_is_stored_as_journals_always_stored_it(outcome, attrs, text):
    trial = recorded(outcome)
    assert trial.user_attrs == attrs
    assert TrialOutcome.of(trial) == outcome == TrialOutcome.from_attrs(attrs)
    assert str(outcome) == text


def test_trials_without_a_known_outcome_have_none_and_count_for_nothing():
    assert TrialOutcome.from_attrs({}) is None  # interrupted
    assert TrialOutcome.from_attrs({"outcome": "exploded"}) is None
    long = recorded(TrialOutcome(Outcome.ERROR, "x" * 5000))
    assert len(long.user_attrs["error"]) == 2000  # a compile error's pages are cut
    done = optuna.trial.TrialState.COMPLETE
    trials = [
        recorded(TrialOutcome(Outcome.MEASURED), done),
        recorded(TrialOutcome(Outcome.DUPLICATE), done),
        recorded(TrialOutcome(Outcome.WRONG, "w")),
        recorded(TrialOutcome(Outcome.TRANSIENT, "OutOfMemoryError: x")),
        recorded(TrialOutcome(Outcome.INVALID, "i")),
    ]
    assert [is_counted(t) for t in trials] == [True, False, True, False, False]
    assert counted_trials(trials) == [trials[0], trials[2]]
    assert measured_trials(trials) == [trials[0]]
    assert {o.value for o in COUNTED_OUTCOMES} == {"measured", "wrong", "error"}


def test_exceptions_are_transient_only_when_they_say_nothing_about_the_candidate():
    assert TrialOutcome.from_exception(torch.OutOfMemoryError("x")).kind is Outcome.TRANSIENT
    assert TrialOutcome.from_exception(ImportError("no lib")).kind is Outcome.TRANSIENT
    assert is_transient(RuntimeError("CUDA out of memory. Tried to allocate"))
    failure = TrialOutcome.from_exception(RuntimeError("illegal memory access"))
    assert failure == TrialOutcome(Outcome.ERROR, "RuntimeError: illegal memory access")
