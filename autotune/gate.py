"""The correctness gate every candidate passes before it is timed, by the tuner and by
``verify``: its result against the float64 reference, decided once per (spec, provider, config)
on a device."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import RopeSpec, get_provider
from kernels.measure import GATE_TOKENS, check_correct
from kernels.providers import RopeFn

from .outcome import Outcome, TrialOutcome
from .space import config_key

__all__ = ["CorrectnessGate", "failure_of"]


def failure_of(exc: BaseException, device: torch.device) -> TrialOutcome:
    """The outcome of a candidate that raised ``exc`` on ``device`` (transient or an error),
    after returning the CUDA memory it may have left cached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TrialOutcome.from_exception(exc)


@dataclass
class CorrectnessGate:
    """Checks candidates against the float64 reference (:func:`kernels.measure.check_correct`
    on :data:`GATE_TOKENS` tokens, key-less calls too where the provider takes them), each
    (spec, provider, config) once: a config shared by several buckets compiles and is checked
    once.

    Attributes:
        device: Where candidates run.
        seed: Seeds the random inputs; None for fresh randomness.
    """

    device: torch.device
    seed: int | None = None
    _results: dict[tuple, TrialOutcome | None] = field(default_factory=dict, init=False, repr=False)

    def check(
        self, fn: RopeFn, spec: RopeSpec, provider: str, config: Mapping[str, Any]
    ) -> TrialOutcome | None:
        """None when ``fn`` (``provider`` with ``config`` built for ``spec``) passes; else why
        not: :attr:`Outcome.WRONG`, :attr:`Outcome.ERROR` (compile error, launch failure), or
        :attr:`Outcome.TRANSIENT` (out of memory...), which is not kept, so the next call checks
        again."""
        key = (spec, provider, config_key(config))
        if key in self._results:
            return self._results[key]
        try:
            keyless = get_provider(provider).supports(spec, has_key=False)
            check_correct(fn, spec, GATE_TOKENS, self.device, keyless=keyless, seed=self.seed)
        except AssertionError as exc:
            result = TrialOutcome(Outcome.WRONG, str(exc))
        except Exception as exc:  # compile error, out of memory, launch failure
            result = failure_of(exc, self.device)
            if result.kind is Outcome.TRANSIENT:
                return result
        else:
            result = None
        self._results[key] = result
        return result
