"""The sampler a study searches its candidate space with."""

from __future__ import annotations

import warnings
import zlib

import optuna

__all__ = ["make_sampler"]


def make_sampler(
    budget: int, seed: int | None, *, providers: int = 1, study_name: str = ""
) -> optuna.samplers.BaseSampler:
    """The sampler for a study whose valid space is larger than its budget.

    TPE, multivariate with groups: a provider's config parameters exist only when that
    provider is chosen (a conditional space), and ``group=True`` models each such sub-space
    jointly instead of treating block sizes, warps and stages as independent, which they are
    not (the tile's register use is their product). ``constant_liar`` keeps parallel workers on
    one study from sampling the same point. A space no larger than the budget is not sampled at
    all: every valid candidate is enqueued (a brute force that skips invalid configs).

    Args:
        budget: The study's counted trials; a third of them (at most 10) start at random.
        seed: Seeds the sampler, mixed with ``study_name`` so that studies differ; None for
            fresh randomness.
        providers: Providers searched: at least one random start each.
        study_name: The study's name.
    """
    per_study_seed = None if seed is None else zlib.crc32(f"{seed}:{study_name}".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            multivariate=True,
            group=True,
            constant_liar=True,
            n_startup_trials=max(providers, min(10, budget // 3)),
            seed=per_study_seed,
        )
