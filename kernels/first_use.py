"""Tuning on first use (opt-in): a spec this device's tables lack is measured when its selector
is built, and the winners are persisted, so the next process starts tuned.

Switched on by ``select_rope(..., tune="first-use")`` or, for stacks that build selectors
themselves (the vLLM plugin, the transformers adapter), by ``ROPE_AUTOTUNE_TUNE=first-use`` in
the environment (:func:`tune_mode`). When the tables have no entry for the exact spec in the
asked timing mode, :func:`tune_on_first_use`, per token bucket of :data:`BUCKETS`:

1. takes the candidates (:func:`candidates`): each tunable provider's default config and the
   performance model's :data:`MODEL_CONFIGS` configs predicted fastest, and every other
   provider available here (those of :data:`NOT_TIMED_ON` for the device type left out);
2. compiles the Triton kernels of them all at once on threads
   (:func:`kernels.compile_ahead.compile_ahead`);
3. gates each distinct candidate once against the float64 reference on fresh random inputs
   (:func:`kernels.measure.check_correct`, key-less too where the provider takes such calls): a
   wrong or failing one is never timed;
4. times the rest briefly (:func:`kernels.measure.time_rope` in the timing mode: CUDA graph
   replay by default, :data:`REPEATS` rounds, the median) and keeps the fastest;
5. merges the entries into the table the next selection reads first
   (:func:`target_path`) with the table writer's lock and atomic rename
   (:func:`kernels.table.merge_into_table`).

Steps 1-5 hold an inter-process lock per (table file, spec, timing mode) beside the target,
and the tables are read again once it is held: a second process selecting the same spec waits,
then finds the first one's entries instead of tuning again. Nothing is tuned inside CUDA graph
capture or ``torch.compile`` tracing (:func:`blocked_reason`); the selection then proceeds as if
tuning were off, and ``explain()`` says why. A failure never raises into the caller: it is
warned about once and the normal selection proceeds.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import orjson
import torch

from . import table as _table  # module attributes: tests redirect the user directory
from ._lookup import warn_once
from ._routes import FALLBACK_BUCKETS, Availability
from ._spec import RopeSpec
from .compile_ahead import compile_ahead
from .measure import GATE_TOKENS, Timing, check_correct, time_rope
from .perf_model import PerfModel
from .providers import RopeFn, get_provider, provider_names
from .table import device_metadata, empty_table, merge_into_table

__all__ = [
    "BUCKETS",
    "FIRST_USE",
    "LOCK_TIMEOUT_S",
    "MODEL_CONFIGS",
    "NOT_TIMED_ON",
    "REPEATS",
    "ROUND_S",
    "TUNE_ENV",
    "Candidate",
    "FirstUse",
    "TuneResult",
    "blocked_reason",
    "candidates",
    "lock_path",
    "target_path",
    "tune_mode",
    "tune_on_first_use",
    "tune_spec",
]

logger = logging.getLogger(__name__)

# The environment variable that switches tuning on first use on for every select_rope call
# that does not pass tune= itself.
TUNE_ENV = "ROPE_AUTOTUNE_TUNE"
FIRST_USE = "first-use"
_OFF = "off"

# The token buckets tuned: the tuner's default buckets (autotune.models.DEFAULT_TOKENS), so a
# first-use table covers what a full tuning covers.
BUCKETS: tuple[int, ...] = FALLBACK_BUCKETS
# Configs of a tunable provider timed per bucket besides its default: the model's fastest
# predicted (why this many: docs/DESIGN.md#first-use-candidates).
MODEL_CONFIGS = 4
# Timed rounds per candidate and their least length (verify's: a ranking among a few
# candidates, not of close configs in a search).
REPEATS = 5
ROUND_S = 0.001
# How long a process waits for another one's tuning of the same spec before giving up on it.
LOCK_TIMEOUT_S = 600.0
# Providers never timed on first use, by device type: on CUDA the eager reference is far too
# slow to win, and torch_compile is far from every winner while its compile would cost seconds
# of the budget (docs/DESIGN.md#first-use-candidates).
NOT_TIMED_ON: Mapping[str, tuple[str, ...]] = {"cuda": ("torch", "torch_compile")}


def tune_mode(tune: str | None) -> str | None:
    """:data:`FIRST_USE` when tuning on first use is on, else None.

    Args:
        tune: ``"first-use"`` or ``"off"``; None defers to ``$ROPE_AUTOTUNE_TUNE`` (unset,
            empty or ``off``: off). A bad value of the variable warns once and counts as off:
            a serving stack never fails on it.

    Raises:
        ValueError: ``tune`` is neither.
    """
    if tune is not None:
        if tune not in (FIRST_USE, _OFF):
            raise ValueError(f"tune: expected {FIRST_USE!r}, {_OFF!r} or None, got {tune!r}")
        return FIRST_USE if tune == FIRST_USE else None
    value = os.environ.get(TUNE_ENV, "").strip().lower()
    if value in ("", _OFF):
        return None
    if value == FIRST_USE:
        return FIRST_USE
    warn_once(
        ("bad-tune-env", value),
        f"rope-autotune: ignoring {TUNE_ENV}={value!r}: expected {FIRST_USE!r} or {_OFF!r}",
        stacklevel=3,
    )
    return None


def blocked_reason() -> str | None:
    """Why nothing may be tuned now, or None: inside ``torch.compile`` tracing, or while the
    current CUDA stream is capturing a graph (a kernel launched then would be recorded, a sync
    would break the capture)."""
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return "inside CUDA graph capture"
    return None


def target_path(table_dir: str | os.PathLike | None, table_file: str) -> Path:
    """Where first-use entries are written: ``table_dir``'s table when given (the only one a
    selector with that ``table_dir`` reads), else ``table_file`` in the user config directory
    (searched before the shipped tables)."""
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        return path if path.suffix == ".json" else path / table_file
    return _table.user_config_dir() / table_file


def lock_path(target: Path, spec: RopeSpec, timing: str) -> Path:
    """The inter-process lock of one (table file, spec, timing mode)'s tuning, beside it."""
    return target.parent / f".{target.name}.{spec.key}.{timing}.first-use.lock"


# -- candidates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A provider and its complete config."""

    provider: str
    config: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, bytes]:
        return self.provider, orjson.dumps(dict(self.config), option=orjson.OPT_SORT_KEYS)


def candidates(
    spec: RopeSpec,
    bucket: int,
    device: torch.device,
    model: PerfModel | None,
    *,
    model_configs: int | None = None,
    unavailable: Availability | None = None,
) -> list[Candidate]:
    """What first use times for ``spec`` at ``bucket`` tokens on ``device``: every registered
    provider available here that computes the spec with a key (those of :data:`NOT_TIMED_ON`
    left out), in registration order; a tunable one with its default config then the
    ``model_configs`` (default :data:`MODEL_CONFIGS`) configs ``model`` predicts fastest (when
    the model knows it), without repeats."""
    model_configs = MODEL_CONFIGS if model_configs is None else model_configs
    unavailable = unavailable or Availability(device)
    skipped = NOT_TIMED_ON.get(device.type, ())
    out: list[Candidate] = []
    seen: set[tuple[str, bytes]] = set()
    for name in provider_names():
        if name in skipped or unavailable(name) is not None:
            continue
        provider = get_provider(name)
        if provider.unsupported_reason(spec, has_key=True) is not None:
            continue
        configs: list[Mapping[str, Any]] = [provider.default_config(spec, bucket)]
        if provider.tunable and model is not None and name in model.providers:
            configs += model.rank_configs(name, spec, bucket, model_configs)
        for config in configs:
            try:
                full = provider.check_config(spec, config)
            except ValueError:
                continue
            candidate = Candidate(name, full)
            if candidate.key not in seen:
                seen.add(candidate.key)
                out.append(candidate)
    return out


# -- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_spec` measured.

    Attributes:
        table: A table (this device's metadata) holding the spec's entries in the timing mode,
            one per bucket where a candidate passed; no entries when none did.
        timed: Timings taken, over all buckets.
        failed: ``"<provider> <config>: <why>"`` for each candidate rejected, wrong or failing.
        seconds: Host seconds the whole measurement took.
        phases: Host seconds per phase: ``compile`` (ahead, in parallel), ``gate``, ``time``.
    """

    table: dict[str, Any]
    timed: int
    failed: tuple[str, ...] = ()
    seconds: float = 0.0
    phases: Mapping[str, float] = field(default_factory=dict)

    def entries(self, spec: RopeSpec, timing: str) -> dict[str, Any]:
        """The spec's entries by bucket (empty when nothing passed)."""
        return self.table["entries"].get(timing, {}).get(spec.key, {})


Timer = Callable[..., Timing]


def tune_spec(
    spec: RopeSpec,
    device: torch.device,
    *,
    timing: str = "graph",
    model: PerfModel | None = None,
    buckets: Sequence[int] | None = None,
    model_configs: int | None = None,
    timer: Timer | None = None,
) -> TuneResult:
    """Measure :func:`candidates` for ``spec`` at each of ``buckets`` (default
    :data:`BUCKETS`) on ``device`` and return the winners as a table; writes nothing.

    Every distinct candidate is built and its Triton kernels compiled in one parallel pass, then
    gated once (fresh random inputs, :data:`GATE_TOKENS` tokens); only those that pass are
    timed, with ``timer`` (default :func:`kernels.measure.time_rope`, called with
    ``mode=timing``, ``repeats=REPEATS`` and ``min_round_s=ROUND_S``). An entry records the
    fastest median, its p20/p80, and each timed provider's best median (``providers_us``), as
    the tuner's entries do. ``model_configs`` defaults to :data:`MODEL_CONFIGS`.
    """
    timer = timer if timer is not None else time_rope
    buckets = BUCKETS if buckets is None else tuple(buckets)
    model_configs = MODEL_CONFIGS if model_configs is None else model_configs
    start = time.perf_counter()
    unavailable = Availability(device)
    per_bucket = {
        b: candidates(spec, b, device, model, model_configs=model_configs, unavailable=unavailable)
        for b in buckets
    }
    distinct = list({c.key: c for cs in per_bucket.values() for c in cs}.values())
    failed: list[str] = []
    fns = _build(spec, distinct, failed)
    keyless = {
        name: get_provider(name).unsupported_reason(spec, has_key=False) is None
        for name in {c.provider for c in distinct}
    }
    compile_ahead([(fn, spec, keyless[key[0]]) for key, fn in fns.items()], device, GATE_TOKENS)
    compiled = time.perf_counter()
    passed = _gate(spec, device, distinct, fns, keyless, failed)
    gated = time.perf_counter()
    entries: dict[str, Any] = {}
    timed = 0
    for bucket, cands in per_bucket.items():
        results: list[tuple[Candidate, Timing]] = []
        for candidate in (c for c in cands if c.key in passed):
            try:
                result = timer(fns[candidate.key], spec, bucket, device, mode=timing,
                               repeats=REPEATS, min_round_s=ROUND_S)  # fmt: skip
            except Exception as exc:  # kernel error, out of memory at this size
                failed.append(_failure(candidate, f"error at {bucket} tokens: {exc!r}"))
                continue
            timed += 1
            times = (result.p20_us, result.median_us, result.p80_us)
            if all(math.isfinite(t) and t > 0 for t in times):
                results.append((candidate, result))
            else:
                failed.append(_failure(candidate, f"no positive time at {bucket}: {result}"))
        if results:
            entries[str(bucket)] = _entry(results)
    table = empty_table(device_metadata(device))
    if entries:
        table["entries"][timing][spec.key] = entries
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the input buffers go back to the serving stack
    end = time.perf_counter()
    phases = {"compile": compiled - start, "gate": gated - compiled, "time": end - gated}
    return TuneResult(table, timed, tuple(failed), end - start, phases)


def _build(
    spec: RopeSpec, distinct: Sequence[Candidate], failed: list[str]
) -> dict[tuple[str, bytes], RopeFn]:
    """Each candidate's callable; a rejected config or failed build goes to ``failed``."""
    fns = {}
    for candidate in distinct:
        provider = get_provider(candidate.provider)
        try:
            fns[candidate.key] = provider.callable_for(spec, candidate.config)
        except Exception as exc:
            failed.append(_failure(candidate, f"rejected: {exc}"))
    return fns


def _gate(
    spec: RopeSpec,
    device: torch.device,
    distinct: Sequence[Candidate],
    fns: Mapping[tuple[str, bytes], RopeFn],
    keyless: Mapping[str, bool],
    failed: list[str],
) -> set[tuple[str, bytes]]:
    """The keys of the candidates that match the float64 reference on fresh random inputs;
    the others go to ``failed``."""
    passed = set()
    seed = secrets.randbits(62)  # fresh inputs, without touching the process's RNG state
    for candidate in distinct:
        fn = fns.get(candidate.key)
        if fn is None:
            continue
        try:
            check_correct(
                fn, spec, GATE_TOKENS, device, keyless=keyless[candidate.provider], seed=seed
            )
        except AssertionError as exc:
            failed.append(_failure(candidate, f"wrong result: {exc}"))
        except Exception as exc:  # compile error, launch failure, out of memory
            failed.append(_failure(candidate, f"error: {type(exc).__name__}: {exc}"))
        else:
            passed.add(candidate.key)
    return passed


def _failure(candidate: Candidate, why: str) -> str:
    return f"{candidate.provider} {dict(candidate.config)}: {why}"


def _entry(results: Sequence[tuple[Candidate, Timing]]) -> dict[str, Any]:
    """A table entry: the fastest median wins (the earlier candidate on a tie)."""
    best, timing = min(results, key=lambda r: r[1].median_us)
    providers_us: dict[str, float] = {}
    for candidate, result in results:
        name = candidate.provider
        providers_us[name] = min(result.median_us, providers_us.get(name, math.inf))
    return {
        "provider": best.provider,
        "config": dict(best.config),
        "median_us": timing.median_us,
        "p20_us": timing.p20_us,
        "p80_us": timing.p80_us,
        "providers_us": dict(sorted(providers_us.items())),
    }


# -- at selection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstUse:
    """What tuning on first use did for one selection.

    Attributes:
        note: One line for ``explain()``: tuned here (and where written), tuned by another
            process or thread meanwhile, or why not.
        unwritten: The tuned table when it could not be written (used by this process
            alone), else None.
        result: The measurement, when this process tuned.
    """

    note: str
    unwritten: dict[str, Any] | None = None
    result: TuneResult | None = None


def tune_on_first_use(
    spec: RopeSpec,
    device: torch.device,
    timing: str,
    target: Path,
    model: PerfModel | None,
    tuned_already: Callable[[], bool],
    *,
    buckets: Sequence[int] | None = None,
) -> FirstUse:
    """Tune ``spec`` (:func:`tune_spec`) and merge its entries into ``target``, under the
    spec's inter-process lock (:func:`lock_path`); ``tuned_already()`` re-reads the tables once
    the lock is held, and when it finds the spec nothing is tuned. Never raises: a failure is
    one warning and a note."""
    blocked = blocked_reason()
    if blocked is not None:
        return FirstUse(f"first-use tuning skipped: {blocked} (build the selector before)")
    started = time.perf_counter()
    lock: filelock.FileLock | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(lock_path(target, spec, timing), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except filelock.Timeout:
        return FirstUse(
            f"first-use tuning skipped: another process held {lock_path(target, spec, timing)} "
            f"for over {LOCK_TIMEOUT_S:.0f} s"
        )
    except OSError as exc:  # no lock can be made there: tune for this process alone
        logger.info("rope-autotune: no first-use lock beside %s (%s)", target, exc)
        lock = None
    try:
        if tuned_already():
            waited = time.perf_counter() - started
            return FirstUse(
                f"tuned on first use by another process or thread (this one waited {waited:.1f} s)"
            )
        return _tune_and_write(spec, device, timing, target, model, buckets)
    except Exception as exc:  # never into the serving stack
        return _failed(spec, exc)
    finally:
        if lock is not None:
            lock.release()


def _tune_and_write(
    spec: RopeSpec,
    device: torch.device,
    timing: str,
    target: Path,
    model: PerfModel | None,
    buckets: Sequence[int] | None,
) -> FirstUse:
    logger.info("rope-autotune: tuning %s (%s) on %s on first use", spec.key, timing, device)
    result = tune_spec(spec, device, timing=timing, model=model, buckets=buckets)
    entries = result.entries(spec, timing)
    did = f"{result.timed} timings in {result.seconds:.1f} s"
    logger.info("rope-autotune: %s tuned on first use: %s buckets, %s", spec.key, len(entries), did)
    if not entries:
        faults = "; ".join(result.failed[:3]) or "no candidate can run here"
        return FirstUse(f"first-use tuning found no candidate that passes ({faults})", None, result)
    try:
        merge_into_table(target, result.table, provider_names())
    except (OSError, ValueError) as exc:
        warn_once(
            ("first-use-unwritten", str(target)),
            f"rope-autotune: first-use tuning of {spec.key} not written to {target} ({exc}); "
            "this process uses it, the next one tunes again",
            stacklevel=5,
        )
        return FirstUse(
            f"tuned on first use by this process ({did}); not written: {exc}", result.table, result
        )
    note = f"tuned on first use by this process ({did}); written to {target}"
    return FirstUse(note, result=result)


def _failed(spec: RopeSpec, exc: BaseException) -> FirstUse:
    fault = f"{type(exc).__name__}: {exc}"
    warn_once(
        ("first-use-failed", spec.key, fault),
        f"rope-autotune: first-use tuning of {spec.key} failed ({fault}); selecting as without it",
        stacklevel=5,
    )
    return FirstUse(f"first-use tuning failed: {fault}")
