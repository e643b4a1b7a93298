"""Tuning on first use against full tuning, per spec, on the device: how long it takes and how
close its choices come.

For each spec of the device's full table (its graph entries; ``--specs`` fnmatch patterns,
``--limit``), with the device's own table and model hidden (a temporary user directory, and a
copy of the shipped configs without this device's files; ``--model FILE`` serves FILE as this
device's model instead, e.g. another device's standing in for a transfer):

1. ``select_rope(..., tune="first-use")``: host seconds, the budget being 20 s per spec of 17
   buckets on an H100, with its phases (compile ahead, gate, timing) and the timings taken;
2. each bucket's first-use choice and the full table's winner re-timed now, alternately
   (CUDA graph replay over rotating inputs, ``--repeats`` rounds, twice each), and the ratio
   first-use / full (1 where both chose the same): geomean and worst per spec and over all.

A fresh Triton cache directory is used unless ``--warm-triton-cache`` (a first use on a new
machine compiles every kernel). The providers are probed once before the first spec (loading
vLLM's op library) and that time is reported apart.

    python benchmarks/first_use.py --device cuda:0 --limit 20 --out $OUT/first_use_h100.txt
    TRITON_INTERPRET=1 python benchmarks/first_use.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "--warm-triton-cache" not in sys.argv:  # before Triton compiles anything
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="first-use-triton-cache-")

import kernels.table as table_mod
from kernels import RopeSpec, RopeTableWarning, get_provider, list_providers
from kernels import first_use as fu
from kernels.measure import time_rope
from kernels.perf_model import model_file_name
from kernels.table import (
    CONFIG_DIR_ENV,
    device_metadata,
    device_table_name,
    read_table,
    table_search_path,
)


@dataclass(frozen=True)
class BucketResult:
    bucket: int
    first_use: tuple[str, Mapping[str, Any]]
    full: tuple[str, Mapping[str, Any]]
    first_use_us: float | None  # re-timed now (None: both chose the same)
    full_us: float | None

    @property
    def ratio(self) -> float:
        if self.first_use_us is None or self.full_us is None:
            return 1.0
        return self.first_use_us / self.full_us


@dataclass(frozen=True)
class SpecResult:
    spec: RopeSpec
    seconds: float
    phases: Mapping[str, float]
    timed: int
    buckets: list[BucketResult]
    missing: list[int]  # buckets of the full table without a first-use entry
    why: str


def full_table_path(device: torch.device, given: str | None) -> Path:
    if given is not None:
        return Path(given)
    name = device_table_name(device_metadata(device)["device_name"])
    for directory in table_search_path():
        if (directory / name).is_file():
            return directory / name
    raise SystemExit(f"no {name} on the search path: pass --table FILE (the full tuning)")


def hide_device_data(device: torch.device, work: Path, model: str | None) -> Path:
    """Point the table search path at a temporary user directory and a copy of the shipped
    configs without this device's table and model; ``model`` is served as this device's model.
    Returns the temporary user directory (where first use writes)."""
    name = device_metadata(device)["device_name"]
    hidden = {device_table_name(name), model_file_name(name)}
    user, shipped = work / "user", work / "shipped"
    user.mkdir(parents=True)
    shipped.mkdir()
    for path in table_mod.shipped_config_dir().glob("*.json"):
        if path.name not in hidden:
            shutil.copy(path, shipped / path.name)
    if model is not None:
        shutil.copy(model, user / model_file_name(name))
    os.environ.pop(CONFIG_DIR_ENV, None)
    table_mod.user_config_dir = lambda: user
    table_mod.shipped_config_dir = lambda: shipped
    return user


def _time(spec: RopeSpec, bucket: int, device: torch.device, choice, repeats: int) -> float:
    provider, config = choice
    fn = get_provider(provider).callable_for(spec, dict(config))
    return time_rope(fn, spec, bucket, device, repeats=repeats).median_us


def compare(
    spec: RopeSpec,
    device: torch.device,
    mine: Mapping[str, Any],
    full: Mapping[str, Any],
    repeats: int,
) -> tuple[list[BucketResult], list[int]]:
    """Each bucket of ``full``: the first-use entry's choice and the full winner re-timed,
    alternately twice (the mean of the medians); a bucket without a first-use entry is missing."""
    results, missing = [], []
    for bucket in sorted(map(int, full)):
        theirs = full[str(bucket)]
        ours = mine.get(str(bucket))
        if ours is None:
            missing.append(bucket)
            continue
        a = (ours["provider"], ours.get("config") or {})
        b = (theirs["provider"], theirs.get("config") or {})
        if a[0] == b[0] and dict(a[1]) == dict(b[1]):
            results.append(BucketResult(bucket, a, b, None, None))
            continue
        times: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(2):
            for side, choice in enumerate((a, b)):
                times[side].append(_time(spec, bucket, device, choice, repeats))
        results.append(
            BucketResult(bucket, a, b, statistics.mean(times[0]), statistics.mean(times[1]))
        )
    return results, missing


def run_spec(
    spec: RopeSpec, device: torch.device, full: Mapping[str, Any], repeats: int
) -> SpecResult:
    seen: list[fu.TuneResult] = []
    real = fu.tune_spec

    def recorded(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    fu.tune_spec = recorded
    try:
        start = time.perf_counter()
        rope = fu_select(spec, device)
        seconds = time.perf_counter() - start
    finally:
        fu.tune_spec = real
    why = rope.explain(1).why
    user_table = read_table(table_mod.user_config_dir() / device_table_name(
        device_metadata(device)["device_name"]))  # fmt: skip
    mine = user_table["entries"]["graph"].get(spec.key, {})
    buckets, missing = compare(spec, device, mine, full, repeats)
    result = seen[0] if seen else None
    return SpecResult(
        spec,
        seconds,
        dict(result.phases) if result else {},
        result.timed if result else 0,
        buckets,
        missing,
        why,
    )


def fu_select(spec: RopeSpec, device: torch.device):
    from kernels import select_rope

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RopeTableWarning)
        return select_rope(
            spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
            spec.dtype, device, tune="first-use",
        )  # fmt: skip


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def report(results: Sequence[SpecResult], probe_s: float, budget_s: float) -> str:
    lines = [
        f"provider probe (once, before the first spec): {probe_s:.1f} s; buckets per spec: "
        f"{len(fu.BUCKETS)}; model configs per bucket: {fu.MODEL_CONFIGS}; timing: "
        f"{fu.REPEATS} rounds of at least {fu.ROUND_S * 1e3:g} ms",
        f"{'spec':<38}{'seconds':>8}{'compile':>8}{'gate':>6}{'time':>6}{'timed':>6}"
        f"{'same':>6}{'geomean':>9}  worst (bucket: first-use vs full)",
    ]
    ratios: list[float] = []
    for r in results:
        spec_ratios = [b.ratio for b in r.buckets]
        ratios += spec_ratios
        same = sum(b.first_use_us is None for b in r.buckets)
        worst = max(r.buckets, key=lambda b: b.ratio, default=None)
        worst_text = "-"
        if worst is not None and worst.first_use_us is not None:
            worst_text = (
                f"{worst.ratio:.3f} ({worst.bucket}: {worst.first_use[0]} "
                f"{worst.first_use_us:.2f} us vs {worst.full[0]} {worst.full_us:.2f} us)"
            )
        p = r.phases
        lines.append(
            f"{r.spec.key:<38}{r.seconds:>8.1f}{p.get('compile', 0):>8.1f}{p.get('gate', 0):>6.1f}"
            f"{p.get('time', 0):>6.1f}{r.timed:>6}{same:>3}/{len(r.buckets):<2}"
            f"{geomean(spec_ratios):>9.3f}  {worst_text}"
        )
        if r.missing:
            lines.append(f"    no first-use entry at {r.missing}: {r.why}")
    seconds = [r.seconds for r in results]
    if results:
        lines.append(
            f"specs: {len(results)}; seconds per spec: median {statistics.median(seconds):.1f}, "
            f"max {max(seconds):.1f} (first spec {seconds[0]:.1f}); within {budget_s:g} s: "
            f"{sum(s <= budget_s for s in seconds)} of {len(seconds)}"
        )
        lines.append(
            f"first-use / full tuning over {len(ratios)} buckets: geomean {geomean(ratios):.4f}, "
            f"worst {max(ratios):.3f}; buckets within 3%: {sum(x <= 1.03 for x in ratios)}"
        )
    return "\n".join(lines)


def write_csv(results: Sequence[SpecResult], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["spec", "bucket", "first_use_provider", "first_use_config",
                         "full_provider", "full_config", "first_use_us", "full_us", "ratio",
                         "spec_seconds"])  # fmt: skip
        for r in results:
            for b in r.buckets:
                ours = [b.first_use[0], dict(b.first_use[1])]
                theirs = [b.full[0], dict(b.full[1])]
                times = [b.first_use_us or "", b.full_us or "", f"{b.ratio:.4f}"]
                writer.writerow([r.spec.key, b.bucket, *ours, *theirs, *times, f"{r.seconds:.2f}"])


def smoke_table() -> tuple[dict, list[RopeSpec]]:
    """A CPU stand-in for a full table: one tiny spec at two buckets, won by torch_compile at
    one (so that the re-timing runs whatever first use picks there) and torch at the other."""
    spec = RopeSpec(16, 16, 2, 1, True, torch.float32)
    table = {"entries": {"graph": {spec.key: {
        "1": {"provider": "torch", "config": {}},
        "16": {"provider": "torch_compile", "config": {}},
    }}}}  # fmt: skip
    return table, [spec]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--table", help="the full tuning's table (default: the device's)")
    parser.add_argument("--model", help="serve this model file as the device's model")
    parser.add_argument("--specs", nargs="*", help="fnmatch patterns on spec keys")
    parser.add_argument("--limit", type=int, help="at most this many specs (evenly spread)")
    parser.add_argument("--repeats", type=int, default=20, help="rounds per re-timing")
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--warm-triton-cache", action="store_true")
    parser.add_argument("--out", help="write the report here too")
    parser.add_argument("--csv", help="write every bucket's comparison here")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny run on the CPU")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        full, specs = smoke_table()
        fu.BUCKETS = (1, 16)
        fu.NOT_TIMED_ON = {"cpu": ("triton",)}
        args.repeats = 3
    else:
        device = torch.device(args.device)
        full = read_table(full_table_path(device, args.table))
        keys = sorted(full["entries"].get("graph", {}))
        if args.specs:
            keys = [k for k in keys if any(fnmatch.fnmatch(k, p) for p in args.specs)]
        if args.limit is not None and len(keys) > args.limit:
            step = len(keys) / args.limit
            keys = [keys[int(i * step)] for i in range(args.limit)]
        specs = [RopeSpec.from_key(k) for k in keys]
    work = Path(tempfile.mkdtemp(prefix="first-use-"))
    hide_device_data(device, work, args.model)
    start = time.perf_counter()
    list_providers(device)
    probe_s = time.perf_counter() - start
    results = []
    for spec in specs:
        result = run_spec(spec, device, full["entries"]["graph"][spec.key], args.repeats)
        results.append(result)
        print(f"{spec.key}: {result.seconds:.1f} s", file=sys.stderr, flush=True)
    text = report(results, probe_s, args.budget_s)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.csv:
        write_csv(results, Path(args.csv))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
