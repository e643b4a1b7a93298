"""The tuner's progress bar: counted trials, with the study being tuned as its description."""

from __future__ import annotations

from typing import IO

import optuna
from optuna.trial import FrozenTrial

from .studies import StudyKey, is_counted

__all__ = ["Progress", "new_bar"]


def new_bar(total: int, *, enabled: bool = True, file: IO[str] | None = None):
    """The tqdm bar the tuner shows over ``total`` counted trials.

    Its time left is the trials left over the run's average rate since the bar started
    (``smoothing=0``), not tqdm's default moving average: a study's first trials compile and
    token counts differ in cost, so a recent rate swings (``benchmarks/journal_time.py --eta``
    replays a journal through this bar).
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="trial", disable=not enabled, dynamic_ncols=True, smoothing=0, file=file
    )


class Progress:
    """A tqdm bar over counted trials, with the study being tuned as its description."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.total = 0

    def start(self, total: int) -> None:
        self.total = total
        self.bar = new_bar(total, enabled=self.enabled)

    def advance(self, count: int) -> None:
        if self.bar is not None and count > 0:
            self.bar.update(count)

    def __enter__(self) -> Progress:
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()

    def describe(self, key: StudyKey) -> None:
        if self.bar is not None:
            self.bar.set_description_str(
                f"{key.timing} {key.spec.key} T={key.tokens}", refresh=False
            )

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.bar is not None and is_counted(trial):
            self.bar.update(1)
