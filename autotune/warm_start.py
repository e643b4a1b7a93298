"""Starting a new study from what is already known about its bucket.

* From the storage: a study's provider set is part of its identity (Optuna fixes a categorical
  parameter's choices per study), so adding a provider (say ``torch_compile``) opens new
  studies. Each starts from the finished trials of the same bucket's study over fewer
  providers, so the new provider costs its default's trial, not a new search (:class:`Donors`).
* From the device's performance model: a new study first measures the Triton configs the model
  predicts fastest for its spec and bucket (:func:`model_candidates`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from kernels.perf_model import PerfModel

from .outcome import TrialOutcome
from .space import Candidate, CandidateSpace
from .studies import StudyKey, counted_trials

__all__ = ["WARM_START_CONFIGS", "Donors", "model_candidates"]

logger = logging.getLogger(__name__)

# Predicted-best Triton configs a new study measures first: the model's top 8 reach within 2%
# of a 48-trial search's best in nearly every recorded bucket (docs/DESIGN.md#warm-start-size).
WARM_START_CONFIGS = 8


def model_candidates(model: PerfModel, count: int = WARM_START_CONFIGS):
    """The runner's ``first_candidates``: the model's ``count`` best predicted Triton configs
    for a study's spec and bucket (none when the study does not search Triton)."""

    def first(key: StudyKey, space: CandidateSpace) -> list[Candidate]:
        if "triton" not in space.providers:
            return []
        ranked = model.rank_configs("triton", key.spec, key.tokens, count)
        return [Candidate("triton", config) for config in ranked]

    return first


@dataclass
class Donors:
    """Finds, for a new study, the study to copy (its donor), once per key.

    The donor has the same bucket (device, timing, spec, tokens), a proper subset of the
    providers, none of them stale, and the most counted trials.
    """

    storage: optuna.storages.BaseStorage
    _names: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)

    def find(self, key: StudyKey) -> tuple[str, list[FrozenTrial]] | None:
        """The donor's name and trials (read fresh), or None."""
        if key.name not in self._names:
            self._names[key.name] = self._search(key)
        name = self._names[key.name]
        if name is None:
            return None
        study_id = self.storage.get_study_id_from_name(name)
        return name, self.storage.get_all_trials(study_id, deepcopy=False)

    def _search(self, key: StudyKey) -> str | None:
        best, most = None, -1
        wanted = set(key.providers)
        for other in self.storage.get_all_studies():
            other_key = StudyKey.from_attrs(other.user_attrs)
            if (
                other_key is None
                or other_key.bucket != key.bucket
                or not set(other_key.providers) < wanted
                or other_key.stale()
            ):
                continue
            trials = self.storage.get_all_trials(other._study_id, deepcopy=False)
            counted = len(counted_trials(trials))
            if counted > most:
                best, most = other.study_name, counted
        return best

    def copy_into(
        self, study: optuna.Study, key: StudyKey, space: CandidateSpace
    ) -> list[FrozenTrial]:
        """Copy the donor's finished trials into the new, empty ``study``.

        Returns:
            The study's trials (the copies; none when there is no donor).
        """
        donor = self.find(key)
        if donor is None:
            return []
        name, trials = donor
        # The provider choices grow; every other parameter keeps its distribution.
        widened = {"provider": CategoricalDistribution(space.providers)}
        if space.tunable:
            widened["tuned_provider"] = CategoricalDistribution(space.tunable)
        copies = [
            optuna.trial.create_trial(
                state=trial.state,
                value=trial.value if trial.state == TrialState.COMPLETE else None,
                params=trial.params,
                distributions={n: widened.get(n, d) for n, d in trial.distributions.items()},
                user_attrs=trial.user_attrs,
            )
            for trial in trials
            if trial.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
            and TrialOutcome.of(trial) is not None  # not an interrupted trial
        ]
        study.add_trials(copies)
        study.set_user_attr("warm_started_from", name)
        logger.info("%s: starts from %d trials of %s", key.name, len(copies), name)
        return study.get_trials(deepcopy=False)
