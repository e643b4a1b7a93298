"""The tuner's progress bar: counted trials, with the study being tuned as its description."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from .studies import StudyKey, is_counted

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over counted trials, with the study being tuned as its description."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.total = 0

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="trial", disable=not self.enabled, dynamic_ncols=True)

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
