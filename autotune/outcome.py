"""What became of a trial: a :class:`TrialOutcome`, kept in the trial's user attributes.

=============  ========  ======================================================  =========
outcome        state     meaning                                                 budget
=============  ========  ======================================================  =========
``measured``   COMPLETE  passed the correctness gate and was timed               counts
``duplicate``  COMPLETE  same provider and config as an earlier trial: its value  no
``wrong``      FAIL      wrong result against the float64 reference              counts
``error``      FAIL      compile error, launch failure, any other kernel error    counts
``transient``  FAIL      out of memory, a library that failed to load            no
``invalid``    PRUNED    the provider rejects the config (e.g. register spills)  no
(none)         FAIL      interrupted, or its worker died                         no
=============  ========  ======================================================  =========

The budget counts measurements. Invalid configs and repeats cost milliseconds (no kernel runs)
and teach the sampler where not to go, so they do not use it up. Transient failures say nothing
about the candidate: they do not count, and a study that measured nothing is never complete, so
the next run retries it. Interrupted trials are redone on resume.

Stored as two user attributes, read and written only here: ``outcome``, the kind's name, and
``error``, why it failed (a wrong result's reads ``wrong result: <message>``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from optuna.trial import BaseTrial, FrozenTrial

__all__ = ["COUNTED_OUTCOMES", "Outcome", "TrialOutcome", "is_transient"]

# Stored reasons are cut to this many characters (a compile error can run to pages).
_MAX_REASON = 2000
_WRONG = "wrong result: "


class Outcome(str, enum.Enum):
    """The kinds of trial outcome (see the module docstring); each equals its stored name."""

    MEASURED = "measured"
    DUPLICATE = "duplicate"
    WRONG = "wrong"
    ERROR = "error"
    TRANSIENT = "transient"
    INVALID = "invalid"


# Outcomes that use up a study's trial budget.
COUNTED_OUTCOMES = frozenset({Outcome.MEASURED, Outcome.WRONG, Outcome.ERROR})


def is_transient(exc: BaseException) -> bool:
    """Failures that say nothing about the candidate, so its study retries on the next run:
    running out of memory, a library that failed to load."""
    if isinstance(exc, (torch.OutOfMemoryError, ImportError, MemoryError)):
        return True
    return "out of memory" in str(exc).lower()


@dataclass(frozen=True)
class TrialOutcome:
    """A trial's outcome and, for a failure, what went wrong.

    Attributes:
        kind: The outcome.
        detail: Why it failed (``"RuntimeError: ..."``, the gate's message for a wrong result,
            the provider's rejection of an invalid config, a failed original's reason for a
            duplicate); empty otherwise.
    """

    kind: Outcome
    detail: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> TrialOutcome:
        """A candidate that raised ``exc``: transient (see :func:`is_transient`) or an error."""
        kind = Outcome.TRANSIENT if is_transient(exc) else Outcome.ERROR
        return cls(kind, f"{type(exc).__name__}: {exc}")

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialOutcome | None:
        """The outcome user attributes ``attrs`` record; None when they record none (an
        interrupted trial) or one this version does not know."""
        try:
            kind = Outcome(attrs.get("outcome"))
        except ValueError:
            return None
        reason = str(attrs.get("error") or "")
        return cls(kind, reason.removeprefix(_WRONG) if kind is Outcome.WRONG else reason)

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialOutcome | None:
        """``trial``'s recorded outcome (see :meth:`from_attrs`)."""
        return cls.from_attrs(trial.user_attrs)

    @property
    def counts(self) -> bool:
        """Whether the trial uses up budget."""
        return self.kind in COUNTED_OUTCOMES

    @property
    def reason(self) -> str:
        """The stored ``error`` attribute: the detail, as ``wrong result: <detail>`` for a wrong
        result."""
        return _WRONG + self.detail if self.kind is Outcome.WRONG else self.detail

    def record(self, trial: BaseTrial) -> None:
        """Write the outcome into ``trial``'s user attributes."""
        trial.set_user_attr("outcome", self.kind.value)
        if self.detail:
            trial.set_user_attr("error", self.reason[:_MAX_REASON])

    def __str__(self) -> str:
        """``wrong result: ...``, ``error: RuntimeError: ...``, ``measured``."""
        if self.kind is Outcome.WRONG:
            return self.reason
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value
