"""What a study tunes, and how far it got.

One Optuna study per (device, timing mode, spec, token bucket, provider set). Its identity lives
in the study's user attributes (:meth:`StudyKey.attrs`), written when the study is created and
read back with :meth:`StudyKey.from_attrs`; the study's name is a deterministic handle that a
rerun uses to find (and resume) it, never parsed.

Each trial records its :class:`autotune.outcome.TrialOutcome`; a study's budget counts the
trials whose outcome judges the candidate (:data:`autotune.outcome.COUNTED_OUTCOMES`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kernels import RopeSpec, get_provider, provider_names
from kernels.table import device_table_name

from .outcome import Outcome, TrialOutcome

__all__ = [
    "StudyKey",
    "counted_trials",
    "device_tag",
    "is_complete",
    "is_counted",
    "live_trials",
    "measured_trials",
    "waiting_trials",
]


def device_tag(device_name: str) -> str:
    """The device name as it appears in table file names and study names."""
    return device_table_name(device_name).removesuffix(".json")


def _revisions(providers: Iterable[str]) -> dict[str, int]:
    return {name: get_provider(name).revision for name in sorted(providers)}


@dataclass(frozen=True)
class StudyKey:
    """What one study tunes.

    Attributes:
        device_name: The device's name (tables are per device name).
        timing: ``"graph"`` or ``"eager"``.
        spec: The shape.
        tokens: The token bucket.
        providers: The providers searched, sorted.
        revisions: Each provider's kernel revision when the study was created; a study whose
            revisions differ from the registered ones timed kernels that no longer run.
    """

    device_name: str
    timing: str
    spec: RopeSpec
    tokens: int
    providers: tuple[str, ...]
    revisions: tuple[tuple[str, int], ...]

    @classmethod
    def current(
        cls, device_name: str, timing: str, spec: RopeSpec, tokens: int, providers: Iterable[str]
    ) -> StudyKey:
        """The key of a study over ``providers`` at their registered revisions."""
        names = tuple(sorted(providers))
        return cls(device_name, timing, spec, tokens, names, tuple(_revisions(names).items()))

    @property
    def name(self) -> str:
        """The study's handle: ``rope:<device>:<timing>:<spec>:<tokens>:<provider[@rev]+...>``.

        The provider set and revisions are part of it because Optuna fixes a categorical
        parameter's choices per study, and a study of an older kernel must not be resumed.
        """
        tags = "+".join(n if r == 1 else f"{n}@{r}" for n, r in self.revisions)
        where = f"{device_tag(self.device_name)}:{self.timing}"
        return f"rope:{where}:{self.spec.key}:{self.tokens}:{tags}"

    @property
    def bucket(self) -> tuple[str, str, RopeSpec, int]:
        """What studies that differ only in their providers share (one table entry)."""
        return self.device_name, self.timing, self.spec, self.tokens

    def attrs(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The user attributes that record this key (and the device's table header)."""
        return {
            "device_name": self.device_name,
            "timing": self.timing,
            "spec": self.spec.key,
            "tokens": self.tokens,
            "providers": list(self.providers),
            "revisions": dict(self.revisions),
            "metadata": dict(metadata),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StudyKey | None:
        """The key a study's user attributes record; None for studies that are not
        rope-autotune studies (another tool's, say) or that lack the attributes."""
        try:
            revisions = attrs["revisions"]
            return cls(
                str(attrs["device_name"]),
                str(attrs["timing"]),
                RopeSpec.from_key(attrs["spec"]),
                int(attrs["tokens"]),
                tuple(sorted(revisions)),
                tuple(sorted((str(n), int(r)) for n, r in revisions.items())),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def stale(self) -> list[str]:
        """Providers this study timed at another revision than the registered one (or that
        are no longer registered), as ``"<name>@<revision>"``."""
        registered = set(provider_names())
        return [
            f"{name}@{revision}"
            for name, revision in self.revisions
            if name not in registered or get_provider(name).revision != revision
        ]


def live_trials(attrs: Mapping[str, Any], trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials of a study's current attempt: a study that measured nothing is retried from
    scratch (its ``retry_from`` attribute is the first trial number of the retry), so its
    earlier failures neither use its budget nor rule candidates out."""
    return trials[int(attrs.get("retry_from") or 0) :]


def is_counted(trial: FrozenTrial) -> bool:
    """Whether ``trial`` used up budget (:attr:`autotune.outcome.TrialOutcome.counts`)."""
    outcome = TrialOutcome.of(trial)
    return outcome is not None and outcome.counts


def counted_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up budget."""
    return [t for t in trials if is_counted(t)]


def measured_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that passed the gate and were timed."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and (outcome := TrialOutcome.of(t)) is not None
        and outcome.kind is Outcome.MEASURED
    ]


def waiting_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Enqueued trials not run yet."""
    return [t for t in trials if t.state == TrialState.WAITING]


def is_complete(
    attrs: Mapping[str, Any], trials: list[FrozenTrial], target: int | None = None
) -> bool:
    """Whether a study is done for ``target`` counted trials (None: the ``target`` attribute
    its runner recorded): it measured something, and either its trials reached the target with
    nothing enqueued left, or it converged earlier (the ``complete`` attribute, set to the
    target it was completed for). Decided from the trials themselves, so a stop between a
    study's last trial and its flag loses nothing."""
    if target is None:
        target = int(attrs.get("target") or attrs.get("complete") or 0)
    if target <= 0 or not measured_trials(trials):
        return False
    if int(attrs.get("complete") or 0) >= target:
        return True
    live = live_trials(attrs, trials)  # a retry's earlier failures do not fill its budget
    return len(counted_trials(live)) >= target and not waiting_trials(live)
