"""Running one study to its trial budget, resuming where it stopped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from kernels import RopeSpec

from .objective import CandidateError, Objective
from .outcome import Outcome, TrialOutcome
from .sampler import make_sampler
from .space import Candidate, CandidateSpace
from .studies import (
    StudyKey,
    counted_trials,
    is_complete,
    is_counted,
    live_trials,
    measured_trials,
    waiting_trials,
)
from .warm_start import Donors

__all__ = ["StudyRunner"]

logger = logging.getLogger(__name__)

# Asks that measure nothing (invalid or repeated configs) a study tolerates per unit of budget,
# beyond a fixed allowance, before it counts as converged.
_MAX_IDLE_ASKS_PER_TRIAL = 4
_MAX_IDLE_ASKS = 20
# Transient failures (out of memory, a library that fails to load) in a row after which a study
# stops for this run; the next run retries it.
_MAX_TRANSIENT = 5

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
# Candidates a new study measures first, beyond each provider's default (e.g. a performance
# model's predicted best configs).
FirstCandidates = Callable[[StudyKey, CandidateSpace], Sequence[Candidate]]


@dataclass
class StudyRunner:
    """Runs the studies of one device.

    Attributes:
        storage: Optuna storage shared by every worker.
        objective: Gates and times one candidate on the device.
        metadata: The table metadata header for this device (stored with each study so that
            ``export`` can write the table without the device); its ``device_name`` names the
            studies.
        trials: Trial budget per study (counted outcomes).
        seed: Seeds the samplers; None for fresh randomness.
        callbacks: Called after every trial with ``(study, frozen_trial)``.
        first_candidates: Candidates a new study measures before sampling, after each
            provider's default; None for none.
    """

    storage: optuna.storages.BaseStorage
    objective: Objective
    metadata: Mapping[str, Any]
    trials: int
    seed: int | None = None
    callbacks: Sequence[TrialCallback] = ()
    first_candidates: FirstCandidates | None = None
    _spaces: dict[tuple[RopeSpec, tuple[str, ...]], CandidateSpace] = field(
        default_factory=dict, init=False, repr=False
    )
    _donors: Donors = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._donors = Donors(self.storage)

    @property
    def device(self):
        return self.objective.device

    @property
    def device_name(self) -> str:
        return self.metadata["device_name"]

    def space(self, spec: RopeSpec, providers: Iterable[str]) -> CandidateSpace:
        key = (spec, tuple(providers))
        if key not in self._spaces:
            self._spaces[key] = CandidateSpace.build(spec, providers, self.device)
        return self._spaces[key]

    def key(self, timing: str, spec: RopeSpec, tokens: int, providers: Iterable[str]) -> StudyKey:
        """The key of the study this runner runs for one bucket."""
        return StudyKey.current(self.device_name, timing, spec, tokens, providers)

    def target(self, space: CandidateSpace) -> int:
        """Counted trials that finish a study: the budget, or the whole valid space if smaller."""
        return min(self.trials, len(space.valid))

    def remaining(self, key: StudyKey) -> int:
        """Counted trials still missing in ``key``'s study (0 when it is complete)."""
        space = self.space(key.spec, key.providers)
        target = self.target(space)
        try:
            study_id = self.storage.get_study_id_from_name(key.name)
            trials = self.storage.get_all_trials(study_id, deepcopy=False)
        except KeyError:
            trials = []
        if not trials:  # not started (or only claimed): a warm start measures new defaults
            donor = self._donors.find(key)
            if donor is None:
                return target
            trials = donor[1]
            donated = {t.user_attrs.get("provider") for t in counted_trials(trials)}
            new = [c for c in space.default_candidates(key.tokens) if c.provider not in donated]
            return max(target - len(counted_trials(trials)), len(new), 1)
        attrs = self.storage.get_study_user_attrs(study_id)
        if is_complete(attrs, trials, target):
            return 0
        if not measured_trials(trials):  # retried from scratch
            return target
        trials = live_trials(attrs, trials)
        return max(target - len(counted_trials(trials)), len(waiting_trials(trials)), 1)

    def is_complete(self, key: StudyKey) -> bool:
        return self.remaining(key) == 0

    def open_study(self, key: StudyKey, space: CandidateSpace) -> optuna.Study:
        """Create or load the study, record what it tunes, and enqueue the candidates that must
        be measured first and are not measured yet: every provider's default, then
        :attr:`first_candidates`, or every valid candidate when the space fits in the budget."""
        study = optuna.create_study(
            storage=self.storage,
            study_name=key.name,
            direction="minimize",
            load_if_exists=True,
            sampler=make_sampler(
                self.trials, self.seed, providers=len(space.providers), study_name=key.name
            ),
        )
        if "revisions" not in study.user_attrs:
            for attr, value in key.attrs(self.metadata).items():
                study.set_user_attr(attr, value)
        if study.user_attrs.get("target") != self.target(space):
            study.set_user_attr("target", self.target(space))
        trials = study.get_trials(deepcopy=False)
        fresh = not trials
        if fresh:
            trials = self._donors.copy_into(study, key, space)
        elif counted_trials(trials) and not measured_trials(trials):
            logger.warning("%s: nothing measured yet; trying again from scratch", key.name)
            study.set_user_attr("retry_from", len(trials))
        trials = live_trials(study.user_attrs, trials)
        taken = {
            _params_key(t.params or t.system_attrs.get("fixed_params", {}))
            for t in trials
            if is_counted(t) or t.state in (TrialState.WAITING, TrialState.RUNNING)
        }
        first = space.default_candidates(key.tokens)
        if len(space.valid) <= self.trials:
            first += space.valid
        elif fresh and self.first_candidates is not None:
            first += [c for c in self.first_candidates(key, space) if space.contains(c)]
        for candidate in first:
            params = space.params(candidate)
            if _params_key(params) not in taken:
                taken.add(_params_key(params))
                study.enqueue_trial(params, user_attrs={"enqueued": True})
        return study

    def run(self, key: StudyKey, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Run ``key``'s study until its counted trials reach the target, it converges, or
        transient failures pile up.

        Returns:
            True when the study is complete.

        Raises:
            KeyboardInterrupt: the trial in flight is failed (so it is redone on resume) and
                the interrupt propagates.
        """
        space = self.space(key.spec, key.providers)
        study = self.open_study(key, space)
        target = self.target(space)
        idle_limit = _MAX_IDLE_ASKS + _MAX_IDLE_ASKS_PER_TRIAL * target
        idle = transient = 0
        converged = False
        while not should_stop():
            # The caller owns this study (see autotune.distributed): no trial but ours runs.
            trials = live_trials(study.user_attrs, study.get_trials(deepcopy=False))
            # Enqueued trials (defaults, a warm start's new providers) run past the budget.
            if len(counted_trials(trials)) >= target and not waiting_trials(trials):
                break
            if idle >= idle_limit:
                logger.info(
                    "%s: converged (%d proposals in a row measured nothing)", key.name, idle
                )
                converged = True
                break
            if transient >= _MAX_TRANSIENT:
                logger.warning(
                    "%s: %d transient failures in a row; the next run retries", key.name, transient
                )
                break
            finished: list[FrozenTrial] = []
            study.optimize(
                lambda trial: self._trial(trial, key, space),
                n_trials=1,
                catch=(CandidateError,),
                callbacks=[*self.callbacks, lambda _s, t, out=finished: out.append(t)],
            )
            for trial in finished:
                outcome = TrialOutcome.of(trial)
                kind = None if outcome is None else outcome.kind
                transient = transient + 1 if kind is Outcome.TRANSIENT else 0
                idle = 0 if is_counted(trial) or kind is Outcome.TRANSIENT else idle + 1
        trials = study.get_trials(deepcopy=False)
        done = is_complete(study.user_attrs, trials, target) or (
            converged and bool(measured_trials(trials))
        )
        if done:  # the target it was completed for: a rerun with a larger budget continues it
            study.set_user_attr("complete", target)
        return done

    def _trial(self, trial: Trial, key: StudyKey, space: CandidateSpace) -> float:
        return self.objective(trial, key, space.suggest(trial))


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))
