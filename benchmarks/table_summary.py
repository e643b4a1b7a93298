"""Summarize a tuned table: where Triton beats the faster of FlashInfer and vLLM, and by how much
select_rope's choice beats each provider.

Reads the per-provider medians that every table entry records (``providers_us``), so it needs
no GPU; the numbers are those the tuner measured on the table's device.

    python benchmarks/table_summary.py configs/NVIDIA_H200.json --ratios bfloat16
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import orjson

RIVALS = ("flashinfer", "vllm")


def summarize(table: dict, timing: str = "graph") -> str:
    """One paragraph per dtype: bucket counts, Triton's losses, the choice's speedups."""
    by_dtype: dict[str, list[tuple[str, int, dict]]] = defaultdict(list)
    for spec_key, buckets in table["entries"].get(timing, {}).items():
        dtype = spec_key.rsplit("_", 1)[-1]
        for tokens, entry in buckets.items():
            by_dtype[dtype].append((spec_key, int(tokens), entry))
    lines = []
    for dtype, entries in sorted(by_dtype.items()):
        specs = {spec for spec, _, _ in entries}
        lines.append(f"{dtype}: {len(specs)} specs, {len(entries)} buckets")
        compared, losses = 0, []
        ratios: dict[str, list[float]] = defaultdict(list)
        for spec, tokens, entry in sorted(entries):
            times = entry["providers_us"]
            for provider in RIVALS:
                if provider in times:
                    ratios[provider].append(times[provider] / entry["median_us"])
            rivals = [times[p] for p in RIVALS if p in times]
            if "triton" not in times or not rivals:
                continue
            compared += 1
            if times["triton"] > min(rivals):
                gap = times["triton"] / min(rivals) - 1
                losses.append(
                    f"  {spec} @ {tokens}: triton {times['triton']:.2f} us, "
                    f"best rival {min(rivals):.2f} us (+{gap:.1%})"
                )
        lines.append(
            f"  triton no slower than the faster of {'/'.join(RIVALS)}: "
            f"{compared - len(losses)} of {compared}"
        )
        lines.extend(losses)
        for provider, values in sorted(ratios.items()):
            geo = math.exp(sum(map(math.log, values)) / len(values))
            lines.append(
                f"  choice vs {provider}: {geo:.2f}x geomean "
                f"({min(values):.2f}x to {max(values):.2f}x, {len(values)} buckets)"
            )
    return "\n".join(lines)


def ratio_table(table: dict, dtype: str, timing: str = "graph") -> str:
    """Markdown: Triton's time over the faster rival's, a row per spec of ``dtype`` (e.g.
    ``bfloat16``) and a column per token bucket any of them has; below 1, Triton is faster."""
    specs = {
        key: buckets
        for key, buckets in table["entries"].get(timing, {}).items()
        if key.rsplit("_", 1)[-1] == dtype
    }
    columns = sorted({int(tokens) for buckets in specs.values() for tokens in buckets})
    lines = [
        "| spec | " + " | ".join(map(str, columns)) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, buckets in sorted(specs.items()):
        cells = []
        for tokens in columns:
            times = buckets.get(str(tokens), {}).get("providers_us", {})
            rivals = [times[p] for p in RIVALS if p in times]
            cells.append(
                f"{times['triton'] / min(rivals):.2f}" if "triton" in times and rivals else "-"
            )
        lines.append(f"| {key.removesuffix('_' + dtype)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a tuned table, e.g. configs/NVIDIA_H200.json")
    parser.add_argument(
        "--timing",
        choices=("graph", "eager"),
        default="graph",
        help="which timing mode's entries to summarize (default: graph)",
    )
    parser.add_argument(
        "--ratios",
        metavar="DTYPE",
        help="also print the Triton / faster-rival table for one dtype, e.g. --ratios bfloat16",
    )
    args = parser.parse_args()
    table = orjson.loads(args.table.read_bytes())
    print(summarize(table, args.timing))
    if args.ratios:
        print()
        print(ratio_table(table, args.ratios, args.timing))


if __name__ == "__main__":
    main()
