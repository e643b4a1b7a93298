"""The candidates one study searches, and their encoding as Optuna parameters.

A candidate is a provider with one full config. The provider is a categorical parameter; a
tunable provider's config parameters are conditional on it, named ``"<provider>.<param>"``;
ordered numeric values (block sizes, warps) are sampled by their index so that the sampler can
exploit their order. Each provider's ``param_space`` is plain data, and its ``check_config`` is
the restriction that rules configs out for a spec.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from optuna.trial import FrozenTrial, Trial

from kernels import RopeSpec, get_provider

__all__ = ["Candidate", "CandidateSpace", "candidate_key", "config_key"]

logger = logging.getLogger(__name__)


def config_key(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable, order-independent form of a config."""
    return tuple(sorted(config.items()))


def candidate_key(trial: FrozenTrial) -> tuple[Any, tuple[tuple[str, Any], ...]]:
    """The :attr:`Candidate.key` a finished trial recorded."""
    return trial.user_attrs.get("provider"), config_key(trial.user_attrs.get("config") or {})


@dataclass(frozen=True)
class Candidate:
    """A provider with one full config."""

    provider: str
    config: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return self.provider, config_key(self.config)


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
            # The spec first: a provider for another layout is ruled out without its probe
            # (vllm_mrope's imports vLLM's rotary layers, seconds).
            reason = provider.unsupported_reason(spec) or provider.unavailable_reason(device)
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
