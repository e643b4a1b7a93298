"""The bench's text outputs: the long-format CSV and the terminal table."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from ._run import CSV_COLUMNS, BenchResult, Skipped

__all__ = ["CSV_NAME", "format_skipped", "format_table", "spec_groups", "write_csv"]

CSV_NAME = "rope_benchmark.csv"


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` as a CSV with exactly :data:`CSV_COLUMNS`; a missing version is empty.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) for k in CSV_COLUMNS})
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _spec_title(row: Mapping[str, Any]) -> str:
    style = "NeoX" if row["is_neox"] else "GPT-J"
    return (
        f"{row['num_heads']} q / {row['num_kv_heads']} kv heads, head {row['head_size']}, "
        f"rotary {row['rotary_dim']}, {style}, {row['dtype']}"
    )


def spec_groups(rows: Sequence[Mapping[str, Any]]):
    """Rows grouped by spec, each group sorted by tokens then provider, one row per token count
    and provider (rows of other (batch, sequence) pairs with the same tokens are repeats)."""
    key = ("head_size", "rotary_dim", "num_heads", "num_kv_heads", "is_neox", "dtype")
    order: dict[tuple, list[Mapping[str, Any]]] = {}
    seen = set()
    for row in rows:
        spec = tuple(row[k] for k in key)
        if (spec, row["num_tokens"], row["provider"]) in seen:
            continue
        seen.add((spec, row["num_tokens"], row["provider"]))
        order.setdefault(spec, []).append(row)
    for spec_rows in order.values():
        yield sorted(spec_rows, key=lambda r: r["num_tokens"])


def format_table(result: BenchResult) -> str:
    """The terminal table: per spec and token count, each provider's p50 [p20, p80], achieved
    TB/s and % of the floor; ``*`` marks the fastest median at each token count."""
    lines = [
        f"device: {result.device}  timing: {result.timing}  floor: bytes moved / measured copy "
        f"bandwidth {result.copy_bandwidth / 1e12:.3g} TB/s"
    ]
    header = (
        f"{'tokens':>7}  {'provider':<14} {'p50 us':>9}  {'[p20, p80] us':<19} {'TB/s':>6} "
        f"{'% floor':>7}  config"
    )
    for group in spec_groups(result.rows):
        lines += ["", _spec_title(group[0]), header, "-" * len(header)]
        for _, same_tokens in groupby(group, key=lambda r: r["num_tokens"]):
            same_tokens = list(same_tokens)
            best = min(r["p50_us"] for r in same_tokens)
            for row in same_tokens:
                mark = "*" if row["p50_us"] == best and len(same_tokens) > 1 else " "
                spread = f"[{row['p20_us']:.4g}, {row['p80_us']:.4g}]"
                lines.append(
                    f"{row['num_tokens']:>7}  {row['provider']:<14}{mark}{row['p50_us']:>9.4g}  "
                    f"{spread:<19} {row['tbps']:>6.3g} {row['pct_floor']:>6.1f}%  {row['config']}"
                )
    if not result.rows:
        lines.append("no provider was timed")
    return "\n".join(lines)


def format_skipped(skipped: Sequence[Skipped]) -> str:
    """One line per provider not timed, with the reason."""
    if not skipped:
        return ""
    return "not timed:\n" + "\n".join(f"  {s}" for s in skipped)
