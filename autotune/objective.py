"""One trial: gate a candidate against the float64 reference, then time it.

A measured trial records ``provider``, ``config``, ``median_us``, ``p20_us``, ``p80_us`` and
``phase_s`` (host seconds spent binding, in the float64 gate, which makes a kernel's first call
and so holds its compile, building inputs, in the warm-up calls, and measuring). Every trial
records its :class:`autotune.outcome.TrialOutcome`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from kernels import get_provider
from kernels.measure import time_rope

from .gate import CorrectnessGate, failure_of
from .outcome import Outcome, TrialOutcome
from .space import Candidate, candidate_key
from .studies import StudyKey, is_counted, live_trials

__all__ = ["SEARCH_REPEATS", "CandidateError", "Objective"]

logger = logging.getLogger(__name__)

# Timed rounds per measurement in a search (time_rope's own default, for reports, is 50): the
# median of 10 rounds ranks configs as well as 50 do (docs/DESIGN.md#search-repeats), at a
# fifth of the cost.
SEARCH_REPEATS = 10


class CandidateError(Exception):
    """A candidate that ran but must never win: wrong result, kernel error, out of memory."""


@dataclass
class Objective:
    """Measures candidates on one device; gate results are kept per process
    (:class:`autotune.gate.CorrectnessGate`).

    Attributes:
        device: Where candidates run.
        seed: Seeds the random inputs; None for fresh randomness.
        time_kwargs: Extra arguments to :func:`kernels.measure.time_rope`; ``repeats``
            defaults to :data:`SEARCH_REPEATS`.
    """

    device: torch.device
    seed: int | None = None
    time_kwargs: Mapping[str, Any] = field(default_factory=dict)
    _gate: CorrectnessGate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gate = CorrectnessGate(self.device, self.seed)

    def __call__(self, trial: Trial, key: StudyKey, candidate: Candidate) -> float:
        """Measure ``candidate`` as ``trial``; the value is its median time in microseconds.

        Raises:
            optuna.TrialPruned: the provider rejects the config, or it repeats a failed one.
            CandidateError: wrong result, kernel error, out of memory.
        """
        trial.set_user_attr("provider", candidate.provider)
        trial.set_user_attr("config", dict(candidate.config))
        provider = get_provider(candidate.provider)
        start = time.perf_counter()
        try:
            fn = provider.callable_for(key.spec, candidate.config)
        except ValueError as exc:
            TrialOutcome(Outcome.INVALID, str(exc)).record(trial)
            raise optuna.TrialPruned(str(exc)) from None

        earlier = _earlier(trial, candidate)
        if earlier is not None:
            return _repeat(trial, earlier)

        bound = time.perf_counter()
        failure = self._gate.check(fn, key.spec, candidate.provider, candidate.config)
        phases = {"bind": bound - start, "gate": time.perf_counter() - bound}
        if failure is None:
            try:
                timing = time_rope(
                    fn,
                    key.spec,
                    key.tokens,
                    self.device,
                    mode=key.timing,
                    seed=self.seed,
                    phases=phases,
                    **{"repeats": SEARCH_REPEATS, **self.time_kwargs},
                )
            except Exception as exc:  # kernel error, out of memory, launch failure
                failure = failure_of(exc, self.device)
            else:
                times = (timing.p20_us, timing.median_us, timing.p80_us)
                if all(math.isfinite(v) and v > 0 for v in times):
                    TrialOutcome(Outcome.MEASURED).record(trial)
                    trial.set_user_attr("phase_s", {k: round(v, 5) for k, v in phases.items()})
                    trial.set_user_attr("median_us", timing.median_us)
                    trial.set_user_attr("p20_us", timing.p20_us)
                    trial.set_user_attr("p80_us", timing.p80_us)
                    return timing.median_us
                failure = TrialOutcome(
                    Outcome.ERROR, f"timing is not a positive finite time: {timing}"
                )
        failure.record(trial)
        logger.info(
            "%s trial %d: %s %s failed: %s",
            key.name,
            trial.number,
            candidate.provider,
            dict(candidate.config),
            failure,
        )
        raise CandidateError(failure.reason)


def _earlier(trial: Trial, candidate: Candidate) -> FrozenTrial | None:
    """An earlier finished trial of the study's current attempt with the same candidate."""
    study = trial.study
    for other in live_trials(study.user_attrs, study.get_trials(deepcopy=False)):
        if (
            other.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
            and other.number != trial.number
            and is_counted(other)
            and candidate_key(other) == candidate.key
        ):
            return other
    return None


def _repeat(trial: Trial, earlier: FrozenTrial) -> float:
    """A repeat of ``earlier``: its value, or pruned when it failed."""
    trial.set_user_attr("duplicate_of", earlier.number)
    if earlier.state != TrialState.COMPLETE:
        original = TrialOutcome.of(earlier)
        TrialOutcome(Outcome.DUPLICATE, original.reason if original else "").record(trial)
        raise optuna.TrialPruned(f"same as failed trial {earlier.number}")
    TrialOutcome(Outcome.DUPLICATE).record(trial)
    for attr in ("median_us", "p20_us", "p80_us"):
        trial.set_user_attr(attr, earlier.user_attrs[attr])
    return float(earlier.value)
