"""Is a tuning table still right on this machine? (``python -m autotune verify``, whose command
line is :mod:`autotune.verify_cli`.)

After a driver, torch, Triton, FlashInfer or vLLM upgrade a table's winners may no longer win.
Each entry's winner and runner-up (the next fastest provider in ``providers_us``; one that cannot
run here is skipped and counted) go through the float64 correctness gate on fresh random inputs
(key-less too where the provider takes key-less calls), then :func:`kernels.measure.time_rope`
in the entry's timing mode; :attr:`Check.problems` judges. :func:`fix_table` re-tunes the
buckets that are not right and merges them into the table.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

from kernels import RopeSpec, get_provider
from kernels.compile_ahead import compile_ahead
from kernels.measure import GATE_TOKENS, Timing, time_rope
from kernels.providers import RopeFn
from kernels.table import (
    TableEntry,
    check_output_dir,
    device_metadata,
    device_table_name,
    spec_entries,
    table_search_path,
)

from .gate import CorrectnessGate
from .space import config_key
from .tuning import tune

__all__ = [
    "BEATEN_MARGIN",
    "SLOWER_MARGIN",
    "Check",
    "Contender",
    "Verifier",
    "default_table_path",
    "fix_table",
    "format_report",
    "plan_checks",
    "write_checks_csv",
]

# A winner re-timed more than this fraction above its recorded median is "slower".
SLOWER_MARGIN = 0.05
# A runner-up must beat the winner by more than this to count: well above the spread of repeated
# timings, with room for fewer rounds (docs/DESIGN.md#verify-margins).
BEATEN_MARGIN = 0.02
# Rounds per measurement and their least length: fewer and shorter than a search's (a verdict
# against a 2-5% margin, not a ranking of close configs), so a whole table takes minutes.
VERIFY_REPEATS = 5
VERIFY_ROUND_S = 0.001
_NOTE_DEFAULT_CONFIG = "default config (a runner-up's tuned config is not recorded)"


@dataclass(frozen=True)
class Contender:
    """A provider and config an entry's check times, with the median the table recorded."""

    provider: str
    config: Mapping[str, Any]
    recorded_us: float
    note: str = ""


@dataclass
class Check:
    """One table entry and what re-timing it found (times in microseconds; None: not timed)."""

    timing: str
    spec: RopeSpec
    tokens: int
    winner: Contender
    runner_up: Contender | None
    unavailable: dict[str, str] = field(default_factory=dict)  # role -> "provider: why not here"
    winner_now: Timing | None = None
    runner_up_now: Timing | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def problems(self) -> tuple[str, ...]:
        """Empty when the entry is right (or not verified: its winner is unavailable here; a
        runner-up unavailable here is skipped, so the winner is checked against its record);
        else ``failing`` (the winner or the runner-up, the selector's fallback, is rejected for
        the spec, fails the gate or raises), ``slower`` (the winner's median is more than
        :data:`SLOWER_MARGIN` above the recorded one) and ``beaten`` (the runner-up is faster
        by more than :data:`BEATEN_MARGIN`); an entry can be both slower and beaten."""
        found = ["failing"] if self.failures else []
        winner, rival = self.winner_now, self.runner_up_now
        if winner is not None and winner.median_us > self.winner.recorded_us * (1 + SLOWER_MARGIN):
            found.append("slower")
        if winner and rival and rival.median_us * (1 + BEATEN_MARGIN) < winner.median_us:
            found.append("beaten")
        return tuple(found)


def default_table_path(device: torch.device) -> Path:
    """The table ``select_rope`` reads for ``device``: the first file named after it along
    :func:`kernels.table.table_search_path`; FileNotFoundError when there is none."""
    name = device_table_name(device_metadata(device)["device_name"])
    dirs = table_search_path()
    for directory in dirs:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {name} in {', '.join(map(str, dirs))}")


def plan_checks(
    table: Mapping[str, Any],
    device: torch.device,
    *,
    timings: Sequence[str] | None = None,
    spec_patterns: Sequence[str] | None = None,
) -> list[Check]:
    """The checks for a validated table's entries, spec-major (a spec's kernels compile once,
    then serve every bucket), filtered by timing mode and by ``fnmatch`` patterns on spec keys.

    A runner-up is the fastest other provider in ``providers_us``; a tunable one gets its
    default config for the spec and bucket, since the table records only the winner's.
    """
    by_spec: dict[str, list[tuple[str, int, TableEntry]]] = {}
    for mode, specs in table["entries"].items():
        if timings is not None and mode not in timings:
            continue
        for spec_key in specs:
            if spec_patterns and not any(fnmatch.fnmatch(spec_key, p) for p in spec_patterns):
                continue
            for tokens, entry in spec_entries(table, mode, spec_key).items():
                by_spec.setdefault(spec_key, []).append((mode, tokens, entry))
    checks = []
    for spec_key in sorted(by_spec):
        spec = RopeSpec.from_key(spec_key)
        for mode, tokens, entry in sorted(by_spec[spec_key], key=lambda c: c[:2]):
            winner = Contender(entry.provider, entry.config or {}, entry.median_us)
            recorded = entry.providers_us.items()
            others = sorted((us, name) for name, us in recorded if name != winner.provider)
            runner_up = None
            for recorded_us, name in others[:1]:
                tunable = bool(get_provider(name).param_space)
                config = get_provider(name).default_config(spec, tokens) if tunable else {}
                note = _NOTE_DEFAULT_CONFIG if tunable else ""
                runner_up = Contender(name, config, recorded_us, note)
            check = Check(mode, spec, tokens, winner, runner_up)
            for role, who in ("winner", winner), ("runner-up", runner_up):
                why = who and get_provider(who.provider).unavailable_reason(device)
                if why:
                    check.unavailable[role] = f"{who.provider}: {why}"
            checks.append(check)
    return checks


@dataclass
class Verifier:
    """Gates and times contenders on one device; each (spec, provider, config) is gated once.

    Attributes:
        device: Where contenders run.
        time_kwargs: ``repeats`` and ``min_round_s`` for :func:`kernels.measure.time_rope`.
        phases: Host seconds spent so far: ``gate``, and time_rope's ``inputs``, ``warmup``
            and ``measure``.
    """

    device: torch.device
    time_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"repeats": VERIFY_REPEATS, "min_round_s": VERIFY_ROUND_S}
    )
    phases: dict[str, float] = field(default_factory=dict)
    _gate: CorrectnessGate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gate = CorrectnessGate(self.device)

    def compile_ahead(self, checks: Sequence[Check]) -> None:
        """Compile the Triton kernels that ``checks`` will gate and time, on a pool of threads
        (:func:`kernels.compile_ahead.compile_ahead`): on a cold cache compiling is most of
        a run, and one at a time it leaves the host's other cores idle."""
        jobs: dict[tuple, tuple[RopeFn, RopeSpec, bool]] = {}
        for check in checks:
            for role, who in ("winner", check.winner), ("runner-up", check.runner_up):
                if who is None or role in check.unavailable or "winner" in check.unavailable:
                    continue
                provider, key = get_provider(who.provider), (check.spec, who.provider)
                with contextlib.suppress(ValueError):  # a rejected config fails in run()
                    fn = provider.callable_for(check.spec, who.config)
                    keyless = provider.supports(check.spec, has_key=False)
                    jobs.setdefault((*key, config_key(who.config)), (fn, check.spec, keyless))
        start = time.perf_counter()
        compile_ahead(jobs.values(), self.device, GATE_TOKENS)
        self.phases["compile ahead"] = time.perf_counter() - start

    def run(self, check: Check) -> Check:
        """Fill in ``check``'s times and failures (of those that run here)."""
        if "winner" in check.unavailable:
            return check
        check.winner_now = self._time(check, check.winner, "winner")
        if check.runner_up is not None and "runner-up" not in check.unavailable:
            check.runner_up_now = self._time(check, check.runner_up, "runner-up")
        return check

    def _time(self, check: Check, contender: Contender, role: str) -> Timing | None:
        name = f"{role} {contender.provider}"
        try:
            fn = get_provider(contender.provider).callable_for(check.spec, contender.config)
        except ValueError as exc:
            check.failures.append(f"{name}: rejected: {exc}")
            return None
        start = time.perf_counter()
        failure = self._gate.check(fn, check.spec, contender.provider, contender.config)
        self.phases["gate"] = self.phases.get("gate", 0.0) + time.perf_counter() - start
        if failure is not None:
            check.failures.append(f"{name}: {failure}")
            return None
        phases: dict[str, float] = {}
        try:
            timing = time_rope(fn, check.spec, check.tokens, self.device, mode=check.timing,
                               phases=phases, **self.time_kwargs)  # fmt: skip
        except Exception as exc:  # kernel error, out of memory, launch failure
            check.failures.append(f"{name}: error: {type(exc).__name__}: {exc}")
            return None
        finally:
            for phase, seconds in phases.items():
                self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        return timing


def _cell(who: Contender | None, now: Timing | None) -> str:
    """``provider[*] recorded -> now us (+change)``; ``*`` marks a default config."""
    if who is None:
        return "-"
    name = who.provider + ("*" if who.note else "")
    change = f"{now.median_us:.2f} ({now.median_us / who.recorded_us - 1:+.1%})" if now else "-"
    return f"{name} {who.recorded_us:.2f} -> {change}"


_HEADER = (
    f"{'timing':<7}{'spec':<36}{'tokens':>7}  {'problems':<22}"
    f"{'winner: recorded -> now us':<44}runner-up: recorded -> now us"
)


def format_report(checks: Sequence[Check]) -> str:
    """The entries that are not right as a table (with each failure's reason), then counts."""
    bad = [c for c in checks if c.problems]
    lines = [_HEADER] if bad else []
    for c in bad:
        lines.append(
            f"{c.timing:<7}{c.spec.key:<36}{c.tokens:>7}  {','.join(c.problems):<22}"
            f"{_cell(c.winner, c.winner_now):<44}{_cell(c.runner_up, c.runner_up_now)}"
        )
        lines += [f"    {failure}" for failure in c.failures]
    if any(c.runner_up is not None and c.runner_up.note for c in bad):
        lines.append(f"* {_NOTE_DEFAULT_CONFIG}")
    skipped = {role: sum(role in c.unavailable for c in checks) for role in ("winner", "runner-up")}
    count = {p: sum(p in c.problems for c in checks) for p in ("failing", "slower", "beaten")}
    verified = len(checks) - skipped["winner"]
    lines.append(
        f"{verified - len(bad)} of {verified} verified entries still right; "
        f"slower than recorded by more than {SLOWER_MARGIN:.0%}: {count['slower']}; "
        f"now beaten (runner-up more than {BEATEN_MARGIN:.0%} faster): {count['beaten']}; "
        f"now failing: {count['failing']}; unavailable here: {skipped['winner']} winners (entry "
        f"not verified), {skipped['runner-up']} runner-ups (winner checked against its record)"
    )
    reasons = {why for c in checks for why in c.unavailable.values()}
    lines += [f"  unavailable here: {why}" for why in sorted(reasons)]
    return "\n".join(lines)


def write_checks_csv(checks: Sequence[Check], path: Path) -> Path:
    """Each check's winner and runner-up as a CSV row each (``config`` as JSON; no times for
    one not timed), with the entry's problems and failures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["timing", "spec", "tokens", "role", "provider", "config", "note",
                         "recorded_us", "median_us", "p20_us", "p80_us", "problems",
                         "failures"])  # fmt: skip
        for c in checks:
            for role, who, now in ("winner", c.winner, c.winner_now), (
                "runner-up", c.runner_up, c.runner_up_now):  # fmt: skip
                if who is None:
                    continue
                times = (now.median_us, now.p20_us, now.p80_us) if now else ("", "", "")
                config = orjson.dumps(dict(who.config)).decode()
                writer.writerow([c.timing, c.spec.key, c.tokens, role, who.provider, config,
                                 who.note, who.recorded_us, *times, ",".join(c.problems),
                                 " | ".join([*c.failures, *c.unavailable.values()])])  # fmt: skip
    return path


def _described(provider: str, config: Mapping[str, Any] | None, median_us: float) -> str:
    return f"{provider} {dict(config) if config else ''} {median_us:.2f} us".replace("  ", " ")


def fix_table(
    checks: Sequence[Check], table_path: Path, device: torch.device, **tune_kwargs: Any
) -> tuple[list[str], list[str]]:
    """Re-tune the buckets of ``checks`` with problems, one :func:`autotune.tune` call per
    (spec, timing mode) with ``tune_kwargs`` (a ``storage`` without the table's original studies,
    which would be resumed rather than re-measured; ``trials``...), merging the results into
    ``table_path`` (named after the device: ``tune`` writes ``<directory>/<device table name>``).

    Returns:
        What changed, one line per bucket; and the buckets that got no new entry.
    """
    groups: dict[tuple[RopeSpec, str], list[Check]] = {}
    for c in checks:
        if c.problems:
            groups.setdefault((c.spec, c.timing), []).append(c)
    changed, missing = [], []
    output = check_output_dir(table_path.parent, "table")  # once, not once per tune() call
    for (spec, timing), bad in groups.items():
        try:
            table = tune([spec], [c.tokens for c in bad], device=device, timing=timing,
                         output=output, **tune_kwargs)  # fmt: skip
        except ValueError as exc:  # no asked provider runs the spec here
            missing += [f"{timing} {spec.key} {c.tokens}: {exc}" for c in bad]
            continue
        entries = spec_entries(table, timing, spec.key)
        for c in bad:
            where = f"{timing} {spec.key} {c.tokens}"
            new = entries.get(c.tokens)
            if new is None:
                missing.append(f"{where}: no study finished (the log above says why)")
                continue
            old = _described(c.winner.provider, c.winner.config, c.winner.recorded_us)
            now = _described(new.provider, new.config, new.median_us)
            changed.append(f"{where}: {old} -> {now}")
    return changed, missing
