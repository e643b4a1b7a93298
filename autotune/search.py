"""One Optuna study per (device, timing mode, spec, token bucket): the candidates, the sampler,
the objective, and the loop that runs a study to its trial budget (resuming where it stopped).

Trial outcomes, recorded in the trial's ``outcome`` user attribute:

=============  ========  ======================================================  =========
outcome        state     meaning                                                 budget
=============  ========  ======================================================  =========
``measured``   COMPLETE  passed the correctness gate and was timed               counts
``duplicate``  COMPLETE  same provider and config as an earlier trial: its value  no
``wrong``      FAIL      wrong result against the float64 reference              counts
``error``      FAIL      compile error, out of memory, any other kernel error    counts
``invalid``    PRUNED    the provider rejects the config (e.g. register spills)  no
(none)         FAIL      interrupted, or its worker died                         no
=============  ========  ======================================================  =========

The budget counts measurements. Invalid configs and repeats cost milliseconds (no kernel runs)
and teach the sampler where not to go (an invalid config is a pruned trial, ranked below every
measured one), so they do not use it up; a study whose sampler keeps proposing only those stops
after enough of them in a row (it has converged). Interrupted trials are redone on
resume.

A measured trial also records ``provider``, ``config``, ``median_us``, ``p20_us``, ``p80_us``
and ``phase_s`` (host seconds spent binding, in the float64 gate, which makes a kernel's first
call and so holds its compile, building inputs, in the warm-up calls, and measuring); trials
asked in a batch for compiling ahead record the batch's wait for that (``batch_precompile_s``).
A study started from another over fewer providers holds copies of that study's trials
(``warm_started_from``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from kernels import RopeSpec, get_provider
from kernels.table import device_table_name

from .storage import default_storage_path, open_storage

__all__ = [
    "COUNTED_OUTCOMES",
    "GATE_TOKENS",
    "SEARCH_REPEATS",
    "Candidate",
    "CandidateSpace",
    "StudyKey",
    "StudyRunner",
    "counted_trials",
    "default_storage_path",
    "device_tag",
    "open_storage",
    "stale_providers",
    "study_name",
]

logger = logging.getLogger(__name__)

# Outcomes that use up a study's trial budget (see the module docstring).
COUNTED_OUTCOMES = frozenset({"measured", "wrong", "error"})
# The correctness gate's token count: odd, and more than the largest token block (64), so a
# full block and a masked partial block are both checked.
GATE_TOKENS = 101
# Timed rounds per measurement in a search (time_rope's own default is 50, for reports). Over
# 9602 H200 Triton trials measured with 50 rounds of >= 2 ms each, the p20-p80 spread between
# rounds was 0.25% of the median (0.53% at the 90th percentile), so the median of 10 rounds
# is within about 0.1% as well; 50 cost 0.1 s a trial, a third of the whole trial.
SEARCH_REPEATS = 10
# Asks that measure nothing (invalid or repeated configs) a study tolerates per unit of budget,
# beyond a fixed allowance, before it counts as converged.
_MAX_IDLE_ASKS_PER_TRIAL = 4
_MAX_IDLE_ASKS = 20


class CandidateError(Exception):
    """A candidate that ran but must never win: wrong result, compile error, out of memory."""


# -- candidates ----------------------------------------------------------------------------------


def _config_key(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(config.items()))


@dataclass(frozen=True)
class Candidate:
    """A provider with one full config."""

    provider: str
    config: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return self.provider, _config_key(self.config)


def _is_ordinal(values: Sequence[Any]) -> bool:
    """Numbers in increasing order: sampled by index, so the sampler sees their order."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numeric and len(values) > 1 and all(a < b for a, b in itertools.pairwise(values))


@dataclass
class CandidateSpace:
    """What a study searches for one spec on one device.

    The provider is a categorical parameter. A tunable provider's config parameters are
    conditional on it, named ``"<provider>.<param>"``; ordered numeric values (block sizes,
    warps) are sampled by their index so the sampler can exploit their order.

    Attributes:
        spec: The shape.
        providers: Names of the providers searched (available on the device, supporting the
            spec), sorted.
        valid: Every valid candidate, defaults first (empty configs for untunable providers).
    """

    spec: RopeSpec
    providers: tuple[str, ...]
    valid: list[Candidate] = field(repr=False)

    @classmethod
    def build(
        cls, spec: RopeSpec, providers: Iterable[str], device: torch.device | str
    ) -> CandidateSpace:
        """The providers of ``providers`` that run ``spec`` on ``device``, and their valid
        configs. Providers that cannot are left out (logged at debug level).

        Raises:
            ValueError: none of ``providers`` can run ``spec`` on ``device``.
        """
        names, reasons = [], []
        for name in dict.fromkeys(providers):
            provider = get_provider(name)
            reason = provider.unavailable_reason(device) or provider.unsupported_reason(spec)
            if reason is None:
                names.append(name)
            else:
                reasons.append(f"{name}: {reason}")
                logger.debug("%s: skipping provider %s", spec.key, reasons[-1])
        if not names:
            raise ValueError(
                f"providers: none can run {spec.key} on {device}: " + "; ".join(reasons)
            )
        names.sort()
        valid = [Candidate(n, get_provider(n).default_config(spec)) for n in names]
        seen = {c.key for c in valid}
        for name in names:
            provider = get_provider(name)
            space = provider.param_space
            for values in itertools.product(*space.values()):
                config = dict(zip(space, values, strict=True))
                candidate = Candidate(name, config)
                if candidate.key in seen:
                    continue
                try:
                    provider.check_config(spec, config)
                except ValueError:
                    continue
                seen.add(candidate.key)
                valid.append(candidate)
        return cls(spec, tuple(names), valid)

    @functools.cached_property
    def _valid_keys(self) -> frozenset:
        return frozenset(c.key for c in self.valid)

    def contains(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is valid here (its provider accepts its config for the spec)."""
        return candidate.key in self._valid_keys

    def default_candidates(self, num_tokens: int) -> list[Candidate]:
        """Each provider's default config for ``num_tokens`` (the first trials of a study)."""
        return [
            Candidate(n, get_provider(n).default_config(self.spec, num_tokens))
            for n in self.providers
        ]

    @property
    def tunable(self) -> tuple[str, ...]:
        """Providers with a config space to search."""
        return tuple(n for n in self.providers if get_provider(n).param_space)

    def suggest(self, trial: Trial) -> Candidate:
        """Sample a candidate: the provider, then its config (conditional on the provider).

        Enqueued trials (each provider's default, or the whole space when it fits the budget)
        choose among every provider (``"provider"``). Sampled trials choose among the tunable
        ones only (``"tuned_provider"``): an untunable provider is one point, measured once by
        its enqueued trial, and a sampler that keeps re-proposing the fastest such point would
        spend the budget on repeats instead of on the configs it is there to search.
        """
        if trial.user_attrs.get("enqueued") or not self.tunable:
            name = trial.suggest_categorical("provider", self.providers)
        else:
            name = trial.suggest_categorical("tuned_provider", self.tunable)
        config = {}
        for param, values in get_provider(name).param_space.items():
            values = tuple(values)
            if _is_ordinal(values):
                config[param] = values[trial.suggest_int(f"{name}.{param}", 0, len(values) - 1)]
            else:
                config[param] = trial.suggest_categorical(f"{name}.{param}", values)
        return Candidate(name, config)

    def params(self, candidate: Candidate) -> dict[str, Any]:
        """The parameters of an enqueued trial that :meth:`suggest` maps to ``candidate``."""
        params: dict[str, Any] = {"provider": candidate.provider}
        for param, values in get_provider(candidate.provider).param_space.items():
            values = tuple(values)
            value = candidate.config[param]
            params[f"{candidate.provider}.{param}"] = (
                values.index(value) if _is_ordinal(values) else value
            )
        return params


# -- studies -------------------------------------------------------------------------------------


def device_tag(device_name: str) -> str:
    """The device name as it appears in table file names and study names."""
    return device_table_name(device_name).removesuffix(".json")


@dataclass(frozen=True)
class StudyKey:
    """What one study tunes."""

    device_name: str
    mode: str
    spec: RopeSpec
    tokens: int
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return study_name(self.device_name, self.mode, self.spec, self.tokens, self.providers)


def study_name(
    device_name: str, mode: str, spec: RopeSpec, tokens: int, providers: Iterable[str]
) -> str:
    """Deterministic, so a rerun finds (and resumes) its study:
    ``rope:<device>:<mode>:<spec key>:<tokens>:<providers joined by +>``.

    The provider set is part of the name because Optuna fixes a categorical parameter's
    choices per study; tables combine studies of the same bucket with different provider sets,
    and a new study starts from the trials of one over fewer providers (see ``_warm_start``).
    A provider past its first revision is named ``<name>@<revision>``: studies that timed an
    older kernel are not resumed (their measurements are stale), those of the others are.
    """
    tags = []
    for name in sorted(providers):
        revision = get_provider(name).revision
        tags.append(name if revision == 1 else f"{name}@{revision}")
    return f"rope:{device_tag(device_name)}:{mode}:{spec.key}:{tokens}:{'+'.join(tags)}"


def stale_providers(name: str) -> list[str]:
    """The providers a study (named by :func:`study_name`) timed at another revision than the
    one registered now, as ``"<name>@<revision>"``; a provider no longer registered counts too.
    Such a study's measurements describe kernels that no longer run. Names not in that form
    have none."""
    if not name.startswith("rope:") or name.count(":") != 5:
        return []
    stale = []
    for tag in name.rsplit(":", 1)[-1].split("+"):
        provider, _, revision = tag.partition("@")
        if revision and not revision.isdigit():  # not a study name (a claim's, say)
            return []
        try:
            current = get_provider(provider).revision
        except KeyError:
            current = None
        if current != int(revision or 1):
            stale.append(tag if revision else f"{tag}@1")
    return stale


def counted_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up budget (see the module docstring)."""
    return [t for t in trials if t.user_attrs.get("outcome") in COUNTED_OUTCOMES]


def make_sampler(
    space: CandidateSpace, budget: int, seed: int | None, name: str
) -> optuna.samplers.BaseSampler:
    """The sampler for a study whose valid space is larger than its budget.

    TPE, multivariate with groups: the config parameters exist only when the provider is
    ``triton`` (a conditional space), and ``group=True`` models each such sub-space jointly
    instead of treating block sizes, warps and stages as independent, which they are not (the
    tile's register use is their product). ``constant_liar`` keeps parallel workers on one
    study from sampling the same point. A space no larger than the budget is not sampled at all:
    every valid candidate is enqueued (a brute force that skips invalid configs).
    """
    import warnings

    per_study_seed = None if seed is None else zlib.crc32(f"{seed}:{name}".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            multivariate=True,
            group=True,
            constant_liar=True,
            n_startup_trials=max(len(space.providers), min(10, budget // 3)),
            seed=per_study_seed,
        )


@dataclass
class _Batch:
    """Trials asked together, their candidates, and the compile started for them."""

    trials: list[Trial]
    candidates: list[Candidate]
    compiling: Any = None  # a pending compile with ``wait()``, or None
    told: list[FrozenTrial] = field(default_factory=list)
    fresh: int = 0  # trials that will be measured (valid, not repeats): what counts

    def record_wait(self, seconds: float) -> None:
        for trial in self.trials:  # the batch's wait for its compiles, beside phase_s
            trial.set_user_attr("batch_precompile_s", round(seconds, 5))

    def wait_compiled(self) -> None:
        if self.compiling is not None:
            start = time.perf_counter()
            self.compiling.wait()
            self.compiling = None
            self.record_wait(time.perf_counter() - start)

    def fail_untold(self, study: optuna.Study) -> None:
        told = {t.number for t in self.told}
        for trial in self.trials:
            if trial.number not in told:
                study.tell(trial, state=TrialState.FAIL)


GateCache = dict[tuple[str, RopeSpec, str, tuple], "str | None"]


@dataclass
class StudyRunner:
    """Runs studies for one device: the objective, the correctness gate and the trial loop.

    Attributes:
        storage: Optuna storage shared by every worker.
        device: Where candidates run.
        device_name: Its name (study names and tables are per device name).
        metadata: The table metadata header for this device (stored with each study so that
            ``export`` can write the table without the device).
        trials: Trial budget per study (counted outcomes).
        seed: Seeds the samplers and the random inputs; None for fresh randomness.
        callbacks: Called after every trial with ``(study, frozen_trial)``.
        time_kwargs: Extra arguments to :func:`autotune.measure.time_rope`; ``repeats``
            defaults to :data:`SEARCH_REPEATS`.
        precompile: Called with a spec and the Triton configs of the next ``batch`` trials
            before they run (e.g. a :class:`autotune.precompile.TritonPrecompiler`), so they
            compile in parallel rather than one per trial; None to compile in the trial.
        batch: Trials measured per batch when ``precompile`` is set: asked from the sampler
            before any is told (its constant liar keeps them apart), plus the invalid and
            repeated asks among them; 1 otherwise.
        overlap: With ``precompile`` (which must then have ``submit``, like
            :class:`autotune.precompile.TritonPrecompiler`): ask the next batch and start
            compiling it before timing the current one, so the workers compile while this
            process measures.
    """

    storage: optuna.storages.BaseStorage
    device: torch.device
    device_name: str
    metadata: Mapping[str, Any]
    trials: int
    seed: int | None = None
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()
    time_kwargs: Mapping[str, Any] = field(default_factory=dict)
    precompile: Callable[[RopeSpec, list[Mapping[str, Any]]], object] | None = None
    batch: int = 1
    overlap: bool = False
    _gate: GateCache = field(default_factory=dict, init=False, repr=False)
    _spaces: dict[tuple[RopeSpec, tuple[str, ...]], CandidateSpace] = field(
        default_factory=dict, init=False, repr=False
    )
    _donors: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)

    def space(self, spec: RopeSpec, providers: Iterable[str]) -> CandidateSpace:
        key = (spec, tuple(providers))
        if key not in self._spaces:
            self._spaces[key] = CandidateSpace.build(spec, providers, self.device)
        return self._spaces[key]

    def target(self, space: CandidateSpace) -> int:
        """Counted trials that finish a study: the budget, or the whole valid space if smaller."""
        return min(self.trials, len(space.valid))

    def remaining(self, key: StudyKey) -> int:
        """Counted trials still missing in ``key``'s study (0 when it is complete)."""
        space = self.space(key.spec, key.providers)
        target = self.target(space)
        try:
            study_id = self.storage.get_study_id_from_name(key.name)
        except KeyError:  # not started: a warm start measures its new providers' defaults
            donor = self._donor(key)
            if donor is None:
                return target
            _, trials = donor
            donated = {t.user_attrs.get("provider") for t in counted_trials(trials)}
            new = [c for c in space.default_candidates(key.tokens) if c.provider not in donated]
            return max(target - len(counted_trials(trials)), len(new))
        # A study that converged before its budget was used up is complete too.
        if int(self.storage.get_study_user_attrs(study_id).get("complete") or 0) >= target:
            return 0
        trials = self.storage.get_all_trials(study_id, deepcopy=False)
        return max(target - len(counted_trials(trials)), len(_waiting(trials)))

    def is_complete(self, key: StudyKey) -> bool:
        return self.remaining(key) == 0

    def open_study(self, key: StudyKey, space: CandidateSpace) -> optuna.Study:
        """Create or load the study, record what it tunes, and enqueue the candidates that must
        be measured first and are not measured yet: every provider's default, or every valid
        candidate when the space fits in the budget."""
        exhaustive = len(space.valid) <= self.trials
        study = optuna.create_study(
            storage=self.storage,
            study_name=key.name,
            direction="minimize",
            load_if_exists=True,
            sampler=make_sampler(space, self.trials, self.seed, key.name),
        )
        if "spec" not in study.user_attrs:
            for attr, value in {
                "device_name": key.device_name,
                "mode": key.mode,
                "spec": key.spec.key,
                "tokens": key.tokens,
                "providers": list(key.providers),
                "metadata": dict(self.metadata),
            }.items():
                study.set_user_attr(attr, value)
        trials = study.get_trials(deepcopy=False)
        if not trials:
            trials = self._warm_start(study, key, space)
        taken = {
            _params_key(t.params or t.system_attrs.get("fixed_params", {}))
            for t in trials
            if t.user_attrs.get("outcome") in COUNTED_OUTCOMES
            or t.state in (TrialState.WAITING, TrialState.RUNNING)
        }
        first = space.default_candidates(key.tokens)
        if exhaustive:
            first += space.valid
        for candidate in _unique(first):
            params = space.params(candidate)
            if _params_key(params) not in taken:
                taken.add(_params_key(params))
                study.enqueue_trial(params, user_attrs={"enqueued": True})
        return study

    def _warm_start(
        self, study: optuna.Study, key: StudyKey, space: CandidateSpace
    ) -> list[FrozenTrial]:
        """Copy into a new study the finished trials of the same bucket's study over fewer
        providers, so adding an untunable provider (torch_compile, say) costs its one trial
        instead of a new search. The donor must have timed every provider at its current
        revision; of several, the one with most measurements is copied.

        Returns:
            The new study's trials (the copies; none when no study qualifies).
        """
        donor = self._donor(key)
        if donor is None:
            return []
        best, best_trials = donor
        # The provider choices grow; every other parameter keeps its distribution.
        widened = {"provider": CategoricalDistribution(space.providers)}
        if space.tunable:
            widened["tuned_provider"] = CategoricalDistribution(space.tunable)
        copies = [
            optuna.trial.create_trial(
                state=trial.state,
                value=trial.value if trial.state == TrialState.COMPLETE else None,
                params=trial.params,
                distributions={
                    name: widened.get(name, dist) for name, dist in trial.distributions.items()
                },
                user_attrs=trial.user_attrs,
            )
            for trial in best_trials
            if trial.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
            and "outcome" in trial.user_attrs  # not an interrupted trial
        ]
        study.add_trials(copies)
        study.set_user_attr("warm_started_from", best)
        logger.info("%s: starts from %d trials of %s", key.name, len(copies), best)
        return study.get_trials(deepcopy=False)

    def _donor(self, key: StudyKey) -> tuple[str, list[FrozenTrial]] | None:
        """The study :meth:`_warm_start` copies for ``key`` (name and trials), if any: same
        device, mode, spec and bucket, a proper subset of the providers, none of them stale,
        the most measurements. Which study it is, is looked up once per runner (the progress
        bar asks every second); its trials are read fresh."""
        if key.name not in self._donors:
            prefix, _, tags = key.name.rpartition(":")
            wanted = set(tags.split("+"))
            best, most = None, -1
            for other in self.storage.get_all_studies():
                other_prefix, _, other_tags = other.study_name.rpartition(":")
                donated = set(other_tags.split("+"))
                if (
                    other_prefix != prefix
                    or not donated < wanted
                    or stale_providers(other.study_name)
                ):
                    continue
                trials = self.storage.get_all_trials(other._study_id, deepcopy=False)
                counted = len(counted_trials(trials))
                if counted > most:
                    best, most = other.study_name, counted
            self._donors[key.name] = best
        name = self._donors[key.name]
        if name is None:
            return None
        study_id = self.storage.get_study_id_from_name(name)
        return name, self.storage.get_all_trials(study_id, deepcopy=False)

    def run(self, key: StudyKey, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Run ``key``'s study until its counted trials reach the target.

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
        idle = 0
        converged = False
        pending: _Batch | None = None  # asked and compiling while the batch before it is timed
        try:
            while not should_stop():
                # The caller owns this study (see autotune.distributed): no trial but ours runs.
                trials = study.get_trials(deepcopy=False)
                counted, waiting = len(counted_trials(trials)), len(_waiting(trials))
                # Enqueued trials (defaults, a warm start's new providers) run past the budget.
                if pending is None and counted >= target and not waiting:
                    break
                if idle >= idle_limit:
                    logger.info(
                        "%s: converged after %d measurements (%d repeated or invalid "
                        "proposals in a row)",
                        key.name,
                        counted,
                        idle,
                    )
                    converged = True
                    break
                if self.precompile is None:
                    finished: list[FrozenTrial] = []
                    study.optimize(
                        lambda trial: self.objective(trial, key, space),
                        n_trials=1,
                        catch=(CandidateError,),
                        callbacks=[*self.callbacks, lambda _s, t, out=finished: out.append(t)],
                    )
                else:
                    size = min(self.batch, max(target - counted, waiting))
                    batch = pending or self._ask_batch(study, key, space, size)
                    pending = None
                    try:
                        batch.wait_compiled()
                        left = max(target - counted, waiting) - batch.fresh
                        # Only sampled trials are asked ahead: an enqueued one (a default, a
                        # new provider) must not be lost if its batch is dropped unrun.
                        ahead = self.overlap and left > 0 and waiting <= len(batch.trials)
                        if ahead and not should_stop():
                            pending = self._ask_batch(study, key, space, min(self.batch, left))
                    except BaseException:
                        batch.fail_untold(study)
                        raise
                    finished = self._finish_batch(study, key, batch)
                for trial in finished:
                    counts = trial.user_attrs.get("outcome") in COUNTED_OUTCOMES
                    idle = 0 if counts else idle + 1
        finally:
            if pending is not None:  # asked but never timed: failed, so the sampler asks anew
                pending.fail_untold(study)
        trials = study.get_trials(deepcopy=False)
        done = converged or (len(counted_trials(trials)) >= target and not _waiting(trials))
        if done:  # the target it was completed for: a rerun with a larger budget continues it
            study.set_user_attr("complete", target)
        return done

    def _ask_batch(
        self, study: optuna.Study, key: StudyKey, space: CandidateSpace, size: int
    ) -> _Batch:
        """Ask trials until ``size`` of them will be measured, and start compiling their Triton
        configs (with ``overlap``) or compile them now.

        Invalid and repeated configs (about 45% of a TPE study's asks on the H200) need no
        compile and use no budget, so they do not fill a batch: each batch gives the workers
        ``size`` configs. What the sampler sees is ``size`` measurements asked before any is
        told, which ``benchmarks/search_replay.py --batch`` replays. At most
        ``size + _MAX_IDLE_ASKS`` asks, so a converged sampler still gets its trials told.
        """
        size = max(1, size)
        batch = _Batch([], [])
        try:
            known = {
                _candidate_key(t)
                for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("outcome") in COUNTED_OUTCOMES
            }
            configs = []  # the new Triton configs: the only ones to compile
            while batch.fresh < size and len(batch.trials) < size + _MAX_IDLE_ASKS:
                trial = study.ask()
                batch.trials.append(trial)
                candidate = self._suggest(trial, space)
                batch.candidates.append(candidate)
                if space.contains(candidate) and candidate.key not in known:
                    known.add(candidate.key)
                    batch.fresh += 1
                    if candidate.provider == "triton":
                        configs.append(candidate.config)
            if configs:  # a batch is asked only with a precompiler
                if self.overlap:
                    batch.compiling = self.precompile.submit(key.spec, configs)
                else:
                    start = time.perf_counter()
                    self.precompile(key.spec, configs)
                    batch.record_wait(time.perf_counter() - start)
        except BaseException:
            batch.fail_untold(study)
            raise
        return batch

    def _finish_batch(self, study: optuna.Study, key: StudyKey, batch: _Batch) -> list[FrozenTrial]:
        """Run a batch's trials one by one (what ``study.optimize`` does for one trial: tell
        the outcome, call the callbacks).

        Raises:
            KeyboardInterrupt: the batch's trials not yet finished are failed (so they are
                redone on resume) and the interrupt propagates.
        """
        try:
            for trial, candidate in zip(batch.trials, batch.candidates, strict=True):
                try:
                    value = self.evaluate(trial, key, candidate)
                except optuna.TrialPruned:
                    frozen = study.tell(trial, state=TrialState.PRUNED)
                except CandidateError:
                    frozen = study.tell(trial, state=TrialState.FAIL)
                else:
                    frozen = study.tell(trial, value)
                batch.told.append(frozen)
                for callback in self.callbacks:
                    callback(study, frozen)
        except BaseException:
            batch.fail_untold(study)
            raise
        return batch.told

    # -- one trial -----------------------------------------------------------------------------

    def objective(self, trial: Trial, key: StudyKey, space: CandidateSpace) -> float:
        """Measure one candidate; the value is its median time in microseconds."""
        return self.evaluate(trial, key, self._suggest(trial, space))

    @staticmethod
    def _suggest(trial: Trial, space: CandidateSpace) -> Candidate:
        candidate = space.suggest(trial)
        trial.set_user_attr("provider", candidate.provider)
        trial.set_user_attr("config", dict(candidate.config))
        return candidate

    def evaluate(self, trial: Trial, key: StudyKey, candidate: Candidate) -> float:
        """Measure ``candidate`` as ``trial``; the value is its median time in microseconds.

        Raises:
            optuna.TrialPruned: the provider rejects the config, or it repeats a failed one.
            CandidateError: wrong result, compile error, out of memory.
        """
        provider = get_provider(candidate.provider)
        start = time.perf_counter()
        try:
            fn = provider.bound(key.spec, candidate.config)
        except ValueError as exc:
            trial.set_user_attr("outcome", "invalid")
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from None

        earlier = self._earlier(trial, candidate)
        if earlier is not None:
            trial.set_user_attr("outcome", "duplicate")
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state != TrialState.COMPLETE:
                trial.set_user_attr("error", earlier.user_attrs.get("error"))
                raise optuna.TrialPruned(f"same as failed trial {earlier.number}")
            for attr in ("median_us", "p20_us", "p80_us"):
                trial.set_user_attr(attr, earlier.user_attrs[attr])
            return float(earlier.value)

        bound = time.perf_counter()
        error = self._gate_error(fn, key.spec, candidate)
        # Where a trial's time goes (seconds), for tuning the tuner: binding, the float64
        # gate (once per spec and config in a process), then time_rope's phases.
        phases = {"bind": bound - start, "gate": time.perf_counter() - bound}
        outcome = "wrong" if error and error.startswith("wrong result") else "error"
        if error is None:
            from .measure import time_rope

            try:
                timing = time_rope(
                    fn,
                    key.spec,
                    key.tokens,
                    self.device,
                    mode=key.mode,
                    seed=self.seed,
                    phases=phases,
                    **{"repeats": SEARCH_REPEATS, **self.time_kwargs},
                )
            except Exception as exc:  # compile error, out of memory, launch failure
                error = f"{type(exc).__name__}: {exc}"
                _release_memory(self.device)
            else:
                if all(
                    math.isfinite(v) and v > 0
                    for v in (timing.p20_us, timing.median_us, timing.p80_us)
                ):
                    trial.set_user_attr("outcome", "measured")
                    trial.set_user_attr("phase_s", {k: round(v, 5) for k, v in phases.items()})
                    trial.set_user_attr("median_us", timing.median_us)
                    trial.set_user_attr("p20_us", timing.p20_us)
                    trial.set_user_attr("p80_us", timing.p80_us)
                    return timing.median_us
                error = f"timing is not a positive finite time: {timing}"
        trial.set_user_attr("outcome", outcome)
        trial.set_user_attr("error", error[:2000])
        logger.info(
            "%s trial %d: %s %s failed: %s",
            key.name,
            trial.number,
            candidate.provider,
            dict(candidate.config),
            error,
        )
        raise CandidateError(error)

    def _earlier(self, trial: Trial, candidate: Candidate) -> FrozenTrial | None:
        """An earlier finished trial of the same study with the same candidate, if any."""
        for other in trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        ):
            if (
                other.number != trial.number
                and other.user_attrs.get("outcome") in ("measured", "wrong", "error")
                and _candidate_key(other) == candidate.key
            ):
                return other
        return None

    def _gate_error(self, fn, spec: RopeSpec, candidate: Candidate) -> str | None:
        """Check ``fn`` against the float64 reference once per (spec, candidate) in this
        process; the reason it failed, or None when it passed."""
        cache_key = (str(self.device), spec, candidate.provider, _config_key(candidate.config))
        if cache_key not in self._gate:
            from .measure import check_correct

            try:
                check_correct(fn, spec, GATE_TOKENS, self.device, seed=self.seed)
            except AssertionError as exc:
                self._gate[cache_key] = f"wrong result: {exc}"
            except Exception as exc:  # compile error, out of memory, launch failure
                self._gate[cache_key] = f"{type(exc).__name__}: {exc}"
                _release_memory(self.device)
            else:
                self._gate[cache_key] = None
        return self._gate[cache_key]


def _waiting(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.WAITING]


def _unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for candidate in candidates:
        if candidate.key not in seen:
            seen.add(candidate.key)
            out.append(candidate)
    return out


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def _candidate_key(trial: FrozenTrial) -> Any:
    return trial.user_attrs.get("provider"), _config_key(trial.user_attrs.get("config") or {})


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
