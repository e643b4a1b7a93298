"""The sampler a study searches its candidate space with."""

from __future__ import annotations

import warnings
import zlib

import optuna

from .space import CandidateSpace

__all__ = ["make_sampler"]


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
