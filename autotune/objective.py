"""One trial: gate a candidate against the float64 reference, then time it.

A measured trial records ``provider``, ``config``, ``median_us``, ``p20_us``, ``p80_us`` and
``phase_s`` (host seconds spent binding, in the float64 gate, which makes a kernel's first call
and so holds its compile, building inputs, in the warm-up calls, and measuring). The outcomes
are those of :mod:`autotune.studies`.
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

from kernels import RopeSpec, get_provider
from kernels.measure import GATE_TOKENS, check_correct, time_rope

from .space import Candidate, candidate_key, config_key
from .studies import COUNTED_OUTCOMES, StudyKey, live_trials

__all__ = ["SEARCH_REPEATS", "CandidateError", "Objective", "is_transient"]

logger = logging.getLogger(__name__)

# Timed rounds per measurement in a search (time_rope's own default, for reports, is 50): the
# median of 10 rounds ranks configs as well as 50 do (benchmarks/NOTES.md), at a fifth of the
# cost.
SEARCH_REPEATS = 10


class CandidateError(Exception):
    """A candidate that ran but must never win: wrong result, kernel error, out of memory."""


def is_transient(exc: BaseException) -> bool:
    """Failures that say nothing about the candidate, so its study retries on the next run:
    running out of memory, a library that failed to load."""
    if isinstance(exc, (torch.OutOfMemoryError, ImportError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text


@dataclass
class Objective:
    """Measures candidates on one device; gate results are kept per process, so a config
    shared by several buckets compiles and is checked once.

    Attributes:
        device: Where candidates run.
        seed: Seeds the random inputs; None for fresh randomness.
        time_kwargs: Extra arguments to :func:`kernels.measure.time_rope`; ``repeats``
            defaults to :data:`SEARCH_REPEATS`.
    """

    device: torch.device
    seed: int | None = None
    time_kwargs: Mapping[str, Any] = field(default_factory=dict)
    _gate: dict[tuple, str | None] = field(default_factory=dict, init=False, repr=False)

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
            trial.set_user_attr("outcome", "invalid")
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from None

        earlier = _earlier(trial, candidate)
        if earlier is not None:
            return _repeat(trial, earlier)

        bound = time.perf_counter()
        error = self._gate_error(fn, key.spec, candidate)
        phases = {"bind": bound - start, "gate": time.perf_counter() - bound}
        if error is None:
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
                error = self._failure(exc)
            else:
                times = (timing.p20_us, timing.median_us, timing.p80_us)
                if all(math.isfinite(v) and v > 0 for v in times):
                    trial.set_user_attr("outcome", "measured")
                    trial.set_user_attr("phase_s", {k: round(v, 5) for k, v in phases.items()})
                    trial.set_user_attr("median_us", timing.median_us)
                    trial.set_user_attr("p20_us", timing.p20_us)
                    trial.set_user_attr("p80_us", timing.p80_us)
                    return timing.median_us
                error = f"error: timing is not a positive finite time: {timing}"
        outcome, _, reason = error.partition(": ")
        trial.set_user_attr("outcome", outcome)
        trial.set_user_attr("error", reason[:2000])
        logger.info(
            "%s trial %d: %s %s failed (%s): %s",
            key.name,
            trial.number,
            candidate.provider,
            dict(candidate.config),
            outcome,
            reason,
        )
        raise CandidateError(reason)

    def _failure(self, exc: BaseException) -> str:
        """``"<outcome>: <reason>"`` for an exception a candidate raised."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        outcome = "transient" if is_transient(exc) else "error"
        return f"{outcome}: {type(exc).__name__}: {exc}"

    def _gate_error(self, fn, spec: RopeSpec, candidate: Candidate) -> str | None:
        """Check ``fn`` against the float64 reference once per (spec, candidate) in this
        process; ``"<outcome>: <reason>"`` when it failed, None when it passed. Transient
        failures are not kept: the next trial checks again."""
        cache_key = (str(self.device), spec, candidate.provider, config_key(candidate.config))
        if cache_key in self._gate:
            return self._gate[cache_key]
        try:
            keyless = get_provider(candidate.provider).unsupported_reason(spec, has_key=False)
            check_correct(
                fn, spec, GATE_TOKENS, self.device, keyless=keyless is None, seed=self.seed
            )
        except AssertionError as exc:
            result = f"wrong: wrong result: {exc}"
        except Exception as exc:  # compile error, out of memory, launch failure
            result = self._failure(exc)
            if result.startswith("transient"):
                return result
        else:
            result = None
        self._gate[cache_key] = result
        return result


def _earlier(trial: Trial, candidate: Candidate) -> FrozenTrial | None:
    """An earlier finished trial of the study's current attempt with the same candidate."""
    study = trial.study
    for other in live_trials(study.user_attrs, study.get_trials(deepcopy=False)):
        if (
            other.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
            and other.number != trial.number
            and other.user_attrs.get("outcome") in COUNTED_OUTCOMES
            and candidate_key(other) == candidate.key
        ):
            return other
    return None


def _repeat(trial: Trial, earlier: FrozenTrial) -> float:
    """A repeat of ``earlier``: its value, or pruned when it failed."""
    trial.set_user_attr("outcome", "duplicate")
    trial.set_user_attr("duplicate_of", earlier.number)
    if earlier.state != TrialState.COMPLETE:
        trial.set_user_attr("error", earlier.user_attrs.get("error"))
        raise optuna.TrialPruned(f"same as failed trial {earlier.number}")
    for attr in ("median_us", "p20_us", "p80_us"):
        trial.set_user_attr(attr, earlier.user_attrs[attr])
    return float(earlier.value)
