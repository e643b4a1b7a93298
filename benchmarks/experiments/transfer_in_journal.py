"""How another device's table choices fare on this device, from this device's tuning journal.

For each study of the journal (one spec and bucket, measured on the journal's device) whose
trials include the other table's choice for that spec and bucket (same provider and config,
e.g. because the warm start proposed it), the choice's median over the study's best median.
This is the transferred table's loss against this device's own search, on the shapes both
tuned, without a device call; single timings of ``--repeats`` rounds, so a few percent is
noise, and only choices the search happened to measure are scored.

    python benchmarks/experiments/transfer_in_journal.py \\
        benchmarks/results/tune_NVIDIA_H100_80GB_HBM3_studies.journal.xz configs/NVIDIA_H200.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from journal_time import opened_journal  # noqa: E402

from autotune.studies import measured_trials  # noqa: E402
from kernels.table import read_table  # noqa: E402


def transfer_ratios(storage, table) -> tuple[list[tuple[str, int, str, float]], int]:
    """``(spec, tokens, provider, choice / best)`` per study where the table's choice was
    measured, and how many studies with a table entry did not measure it."""
    rows, unmeasured = [], 0
    for summary in storage.get_all_studies():
        attrs = summary.user_attrs
        timing, spec, tokens = attrs.get("timing"), attrs.get("spec"), attrs.get("tokens")
        entry = table.get("entries", {}).get(timing, {}).get(spec, {}).get(str(tokens))
        if entry is None:
            continue
        study_id = storage.get_study_id_from_name(summary.study_name)
        measured = measured_trials(storage.get_all_trials(study_id, deepcopy=False))
        if not measured:
            continue
        best = min(t.user_attrs["median_us"] for t in measured)
        choice = (entry["provider"], entry.get("config") or {})
        hits = [
            t.user_attrs["median_us"]
            for t in measured
            if (t.user_attrs.get("provider"), t.user_attrs.get("config") or {}) == choice
        ]
        if hits:
            rows.append((spec, int(tokens), entry["provider"], min(hits) / best))
        else:
            unmeasured += 1
    return rows, unmeasured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal", help="this device's tuning journal (.xz accepted)")
    parser.add_argument("table", help="the other device's table, e.g. configs/NVIDIA_H200.json")
    parser.add_argument("--worst", type=int, default=8, help="list this many worst choices")
    args = parser.parse_args(argv)
    with opened_journal(args.journal) as storage:
        rows, unmeasured = transfer_ratios(storage, read_table(args.table))
    if not rows:
        print(f"no study measured the table's choice ({unmeasured} studies with an entry)")
        return 1
    ratios = [r for *_, r in rows]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(
        f"{len(rows)} studies measured the table's choice ({unmeasured} with an entry did not); "
        f"choice / study's best: geomean {geomean:.3f}, worst {max(ratios):.3f}, "
        f"{sum(r > 1.05 for r in ratios)} above 1.05"
    )
    for spec, tokens, provider, ratio in sorted(rows, key=lambda row: -row[3])[: args.worst]:
        print(f"  {spec} @ {tokens}: {provider} {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
