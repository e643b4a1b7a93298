"""Where a tuning run's device time went, per op (RoPE, mRoPE), from its Optuna journal.

A run resumed over several device calls leaves one journal; this reads it (``.xz`` too) and
reports, per op and timing mode: studies complete and started, counted trials, and seconds in
studies (each study's first trial start to its last trial end, less its gaps over ``--gap-s``,
summed). The run's stretches (trials separated by more than ``--gap-s``: one device call each)
give the wall time, including what lies between studies (the warm start, table writes). A
study's time is charged to the op of its spec, so mRoPE specs joining the default space are
timed apart from the RoPE ones.

``--phases`` adds, per op and provider, where its trials' seconds went: each phase the trials
recorded (``phase_s``: binding, the float64 gate, building inputs, warm-up, measuring), how many
trials ran the gate (the first trial of a config in a process: for Triton, its compiles) and
its median seconds when it ran, and the trials' seconds outside those phases (sampling, the
storage's writes; trials asked in batches overlap, so for them it also holds the waits).

``--eta`` replays one op's counted trials, in the order they finished, through the tuner's own
progress bar (on a replayed clock), one bar per stretch as the device calls had, and reports at
fractions of each stretch the time left it estimated against the time left in fact.

    python benchmarks/journal_time.py \\
        benchmarks/results/tune_NVIDIA_H100_80GB_HBM3_studies.journal.xz --eta rope --phases
"""

from __future__ import annotations

import argparse
import contextlib
import lzma
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune.storage import open_storage  # noqa: E402
from autotune.studies import counted_trials, is_complete  # noqa: E402
from kernels import RopeSpec  # noqa: E402


@dataclass
class OpTime:
    """One op and timing mode's share of a run."""

    studies: int = 0
    complete: int = 0
    trials: int = 0
    seconds: float = 0.0
    spans: list[tuple[datetime, datetime]] = field(default_factory=list)


@contextlib.contextmanager
def opened_journal(path: str | Path) -> Iterator:
    """The Optuna storage of a tuning journal, read from a decompressed copy when it is ``.xz``
    (the archive itself is left as it is)."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix == ".xz":
            plain = Path(tmp) / path.stem
            with lzma.open(path) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            path = plain
        yield open_storage(path, create=False)


def studies(storage) -> Iterator[tuple[str, dict, list]]:
    """``(op, user attributes, trials)`` of each study of ``storage`` with a spec attribute,
    ``op`` being ``"mrope"`` or ``"rope"`` by its spec."""
    for summary in storage.get_all_studies():
        attrs = summary.user_attrs
        if "spec" not in attrs:
            continue
        op = "mrope" if RopeSpec.from_key(attrs["spec"]).is_mrope else "rope"
        study_id = storage.get_study_id_from_name(summary.study_name)
        yield op, attrs, storage.get_all_trials(study_id, deepcopy=False)


def op_times(storage, gap_s: float = 60.0) -> dict[tuple[str, str], OpTime]:
    """Per (op, timing): the studies of ``storage`` with a spec attribute, and their trials. A
    study's seconds leave out its gaps above ``gap_s`` (one stopped in a device call and resumed
    in the next)."""
    times: dict[tuple[str, str], OpTime] = defaultdict(OpTime)
    for op, attrs, trials in studies(storage):
        entry = times[(op, attrs.get("timing", "?"))]
        entry.studies += 1
        entry.complete += is_complete(attrs, trials)
        entry.trials += len(counted_trials(trials))
        spans = [
            (t.datetime_start, t.datetime_complete)
            for t in trials
            if t.datetime_start and t.datetime_complete
        ]
        entry.seconds += sum(stretches(spans, gap_s))
        entry.spans.extend(spans)
    return dict(times)


# The phases a measured trial records, in the order they run (autotune.objective).
PHASES = ("bind", "gate", "inputs", "warmup", "measure")
# A gate phase longer than this ran the check (a kernel's first call, its compile included);
# a shorter one found the process's earlier result for the config.
GATE_RAN_S = 0.001


@dataclass
class PhaseTime:
    """One op and provider's measured trials: seconds per phase, and in the trials in all."""

    trials: int = 0
    gate_runs: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall: float = 0.0


def phase_times(storage) -> dict[tuple[str, str], PhaseTime]:
    """Per (op, provider): the trials of ``storage`` that recorded their phases."""
    times: dict[tuple[str, str], PhaseTime] = defaultdict(PhaseTime)
    for op, _, trials in studies(storage):
        for t in trials:
            phases = t.user_attrs.get("phase_s")
            if not phases or not (t.datetime_start and t.datetime_complete):
                continue
            entry = times[(op, t.user_attrs.get("provider", "?"))]
            entry.trials += 1
            if phases.get("gate", 0.0) > GATE_RAN_S:
                entry.gate_runs.append(phases["gate"])
            for name, seconds in phases.items():
                entry.phases[name] = entry.phases.get(name, 0.0) + seconds
            entry.wall += (t.datetime_complete - t.datetime_start).total_seconds()
    return dict(times)


def phase_report(times: dict[tuple[str, str], PhaseTime]) -> str:
    names = list(dict.fromkeys([*PHASES, *(n for t in times.values() for n in t.phases)]))
    lines = [
        "| op | provider | trials | gate ran | median s a gate run | "
        + " | ".join(f"s {n}" for n in names)
        + " | s outside phases | s per trial |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for (op, provider), t in sorted(times.items()):
        outside = t.wall - sum(t.phases.values())
        gate_median = statistics.median(t.gate_runs) if t.gate_runs else 0.0
        lines.append(
            f"| {op} | {provider} | {t.trials} | {len(t.gate_runs)} | {gate_median:.3f} | "
            + " | ".join(f"{t.phases.get(n, 0.0):.1f}" for n in names)
            + f" | {outside:.1f} | {t.wall / t.trials:.3f} |"
        )
    return "\n".join(lines)


def stretches(spans: list[tuple[datetime, datetime]], gap_s: float) -> list[float]:
    """Seconds of each run of overlapping or close spans (gaps above ``gap_s`` split them)."""
    out: list[list[datetime]] = []
    for start, end in sorted(spans):
        if out and (start - out[-1][1]).total_seconds() <= gap_s:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(end - start).total_seconds() for start, end in out]


def finish_times(storage, op: str, gap_s: float) -> list[list[float]]:
    """Per stretch of the run (trials apart by more than ``gap_s``: one device call, one
    process and one progress bar each), the seconds from its first trial's start at which each
    counted trial of ``op``'s studies finished, in order."""
    spans = []
    for study_op, _, trials in studies(storage):
        if study_op != op:
            continue
        spans += [
            (t.datetime_start, t.datetime_complete)
            for t in counted_trials(trials)
            if t.datetime_start and t.datetime_complete
        ]
    spans.sort(key=lambda span: span[1])
    out: list[list[float]] = []
    start = last = None
    for begin, end in spans:
        if last is None or (end - last).total_seconds() > gap_s:
            start = begin
            out.append([])
        out[-1].append((end - start).total_seconds())
        last = end
    return out


def eta_replay(
    finished: list[float], fractions=(0.1, 0.25, 0.5, 0.75, 0.9)
) -> list[tuple[float, float, float]]:
    """(fraction done, estimated s left, true s left) at each of ``fractions``: the tuner's
    progress bar (:func:`autotune.progress.new_bar`) over ``len(finished)`` trials, advanced one
    trial at each finish time on a replayed clock."""
    import io

    from autotune.progress import new_bar

    now = [0.0]
    bar = new_bar(len(finished), file=io.StringIO())
    bar._time = lambda: now[0]  # the bar reads its clock through this attribute
    bar.start_t = bar.last_print_t = 0.0
    marks = sorted(round(f * len(finished)) for f in fractions)
    out = []
    for n, t in enumerate(finished, 1):
        now[0] = t
        bar.update(1)
        if marks and n == marks[0]:
            marks.pop(0)
            rate = (
                bar.format_dict["rate"] or n / t
            )  # what the bar shows: its rate, else n / elapsed
            out.append((n / len(finished), (len(finished) - n) / rate, finished[-1] - t))
    bar.close()
    return out


def report(times: dict[tuple[str, str], OpTime], gap_s: float) -> str:
    lines = [
        "| op | timing | studies complete / started | counted trials | s in studies "
        "| s per study | trials/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (op, timing), t in sorted(times.items()):
        per_study = t.seconds / t.studies if t.studies else 0.0
        rate = t.trials / t.seconds if t.seconds else 0.0
        lines.append(
            f"| {op} | {timing} | {t.complete} / {t.studies} | {t.trials} | {t.seconds:.0f} "
            f"| {per_study:.2f} | {rate:.2f} |"
        )
    spans = [span for t in times.values() for span in t.spans]
    walls = stretches(spans, gap_s)
    lines.append(
        f"\nstretches (gaps over {gap_s:.0f} s split them): "
        + ", ".join(f"{w:.0f} s" for w in walls)
        + f"; wall {sum(walls):.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal", help="the tuner's journal file (.xz accepted)")
    parser.add_argument("--gap-s", type=float, default=60.0, help="a gap that splits stretches")
    parser.add_argument(
        "--phases", action="store_true", help="where each op and provider's trials spent time"
    )
    parser.add_argument(
        "--eta",
        choices=("rope", "mrope"),
        help="replay this op's trials through the progress bar and compare its estimates",
    )
    args = parser.parse_args(argv)
    with opened_journal(args.journal) as storage:
        print(report(op_times(storage, args.gap_s), args.gap_s))
        if args.phases:
            print("\nthe measured trials' seconds, per phase:")
            print(phase_report(phase_times(storage)))
        if args.eta:
            print(
                f"\nthe progress bar's time left over {args.eta}'s counted trials, a bar per "
                "stretch:\n| stretch | trials | s | done | estimated s left | true s left "
                "| estimate / truth |\n|---|---|---|---|---|---|---|"
            )
            for index, finished in enumerate(finish_times(storage, args.eta, args.gap_s), 1):
                for done, estimate, truth in eta_replay(finished):
                    print(
                        f"| {index} | {len(finished)} | {finished[-1]:.0f} | {done:.0%} "
                        f"| {estimate:.0f} | {truth:.0f} | {estimate / truth:.2f} |"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
