"""What a study tunes, and how far it got.

One Optuna study per (device, timing mode, spec, token bucket, provider set). Its identity lives
in the study's user attributes (:meth:`StudyKey.attrs`), written when the study is created and
read back with :meth:`StudyKey.from_attrs`; the study's name is a deterministic handle that a
rerun uses to find (and resume) it, never parsed.

Trial outcomes, recorded in the trial's ``outcome`` user attribute:

=============  ========  ======================================================  =========
outcome        state     meaning                                                 budget
=============  ========  ======================================================  =========
``measured``   COMPLETE  passed the correctness gate and was timed               counts
``duplicate``  COMPLETE  same provider and config as an earlier trial: its value  no
``wrong``      FAIL      wrong result against the float64 reference              counts
``error``      FAIL      compile error, launch failure, any other kernel error    counts
``transient``  FAIL      out of memory, a library that failed to load            no
``invalid``    PRUNED    the provider rejects the config (e.g. register spills)  no
(none)         FAIL      interrupted, or its worker died                         no
=============  ========  ======================================================  =========

The budget counts measurements. Invalid configs and repeats cost milliseconds (no kernel runs)
and teach the sampler where not to go, so they do not use it up. Transient failures say nothing
about the candidate: they do not count, and a study that measured nothing is never complete, so
the next run retries it. Interrupted trials are redone on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kernels import RopeSpec, get_provider, provider_names
from kernels.table import device_table_name

__all__ = [
    "COUNTED_OUTCOMES",
    "StudyKey",
    "counted_trials",
    "device_tag",
    "is_complete",
    "live_trials",
    "measured_trials",
    "waiting_trials",
]

# Outcomes that use up a study's trial budget (see the module docstring).
COUNTED_OUTCOMES = frozenset({"measured", "wrong", "error"})


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
        rope-autotune studies (claims, say) or that lack the attributes."""
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


def counted_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up budget (see the module docstring)."""
    return [t for t in trials if t.user_attrs.get("outcome") in COUNTED_OUTCOMES]


def measured_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that passed the gate and were timed."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("outcome") == "measured"
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
