"""Leave-one-shape-out evidence for the performance model (``kernels/perf_model.py``), on the CPU.

For each shape of the journal (a spec without its dtype: both the bf16 and the fp16 spec are left
out together, since a bf16 twin times like its fp16 spec), fit the model on the other shapes,
predict every bucket of the shape, and score:

- the model's pick (fastest predicted provider, Triton's fastest predicted config), by the
  pick's MEASURED time in the journal against the bucket's measured best (the table's winner);
  a Triton pick the journal never timed is listed for a GPU measurement (``--missing``);
- today's rule for a spec without a table entry: the nearest spec (same head size, rotary dim,
  style and element size) among the other shapes, its winner at that bucket run on this spec
  (an invalid config falls back to the best recorded provider, as the selector does), else
  Triton's default config (always measured: every study times it first);
- warm start: the model's ranking of the bucket's measured Triton configs, measured in that
  order after the vendor providers and Triton's default (as a study starts), and how many
  trials reach within 2% of the 48-trial best.

    python benchmarks/perf_model_loso.py --journal /tmp/studies.journal \
        --rows-cache /tmp/perf_rows.csv --out benchmarks/results/perf_model_loso.txt \
        --missing benchmarks/results/perf_model_loso_missing.csv

``--extra-rows CSV`` adds measurements (``autotune.perf_model_fit.write_rows`` format) to the
journal's when scoring. On the GPU, ``--measure CSV --device cuda:0 --extra-out OUT.csv`` times
the rows of a ``--missing`` list (float64 gate first, then CUDA-graph replay, 10 rounds as the
tuner) and writes them in that format; nothing else runs::

    python benchmarks/perf_model_loso.py --measure benchmarks/results/perf_model_loso_missing.csv \
        --device cuda:0 --extra-out $OUT/perf_model_loso_measured.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autotune.perf_model_fit import (
    Measurement,
    fit_model,
    measurements_from_storage,
    read_rows,
    write_rows,
)
from autotune.storage import open_storage
from kernels import RopeSpec, get_provider, nearest_spec_key
from kernels.perf_model import PerfModel, choose_between_buckets
from kernels.providers import TRITON, default_triton_config

WITHIN = 1.02
BUDGETS = (1, 2, 4, 8, 12, 16, 24, 32, 48)
MARGINS = (1.0, 1.05, 1.1)
TOP_K = 4
TOP_K_DTYPE = "bfloat16"  # the GPU list of unmeasured top-k configs: one dtype is enough


def shape_of(spec_key: str) -> str:
    return spec_key.rsplit("_", 1)[0]


def config_key(config) -> str:
    return json.dumps(config, sort_keys=True) if config else ""


def load(args) -> tuple[list[Measurement], dict]:
    meta = {"device_name": "NVIDIA H200", "sm_count": 132}
    if args.rows_cache and Path(args.rows_cache).exists():
        rows = read_rows(args.rows_cache)
    else:
        rows, meta = measurements_from_storage(open_storage(args.journal, create=False))
        if args.rows_cache:
            write_rows(args.rows_cache, rows)
    return rows, meta


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summary(name: str, ratios: list[float]) -> str:
    if not ratios:
        return f"{name}: no buckets"
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    return (
        f"{name}: {len(ratios)} buckets, geomean {geo:.4f}, median {pct(ratios, 50):.4f}, "
        f"p90 {pct(ratios, 90):.4f}, p95 {pct(ratios, 95):.4f}, worst {max(ratios):.4f}, "
        f"within 2%: {sum(r <= WITHIN for r in ratios)}, within 5%: "
        f"{sum(r <= 1.05 for r in ratios)}"
    )


def measure(listing: str, device: str, out: str, repeats: int, index: int, count: int) -> int:
    """Time each (spec, tokens, provider, config) of ``listing`` on ``device``; ``out`` is
    rewritten after each one, so a run stopped by a time limit keeps what it measured."""
    from kernels.measure import check_correct, time_rope

    rows = []
    with open(listing, newline="") as f:
        todo = list(csv.DictReader(f))[index::count]
    for i, item in enumerate(todo, 1):
        spec = RopeSpec.from_key(item["spec"])
        tokens, name = int(item["tokens"]), item["provider"]
        config = json.loads(item["config"]) if item["config"] else None
        try:
            fn = get_provider(name).callable_for(spec, config)
            check_correct(fn, spec, tokens, device, seed=i)
            timing = time_rope(fn, spec, tokens, device, repeats=repeats)
        except Exception as exc:  # a wrong or failing config is reported, never scored
            print(f"{item['spec']} {tokens} {name} {config}: {type(exc).__name__}: {exc}")
            continue
        rows.append(Measurement(spec.key, tokens, name, config, timing.median_us))
        write_rows(out, rows)
        print(f"[{i}/{len(todo)}] {spec.key} {tokens} {name} {config}: {timing.median_us:.3f} us")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--journal", help="the tuner's journal (decompressed)")
    parser.add_argument("--rows-cache", help="CSV cache of the journal's rows (read if present)")
    parser.add_argument(
        "--extra-rows", action="append", default=[], help="CSV of extra timings (repeatable)"
    )
    parser.add_argument("--out", help="write the report here as well")
    parser.add_argument("--missing", help="write the unmeasured picks here (CSV)")
    parser.add_argument("--missing-top", help="write the unmeasured top-k configs here (CSV)")
    parser.add_argument("--measure", help="GPU: time the rows of this --missing CSV")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--extra-out", help="with --measure: write the timings here")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shard", default="0/1", help="with --measure: I/N, every N-th row")
    args = parser.parse_args()
    if args.measure:
        if not args.extra_out:
            parser.error("--measure needs --extra-out")
        index, count = map(int, args.shard.split("/"))
        return measure(args.measure, args.device, args.extra_out, args.repeats, index, count)
    started = time.perf_counter()
    rows, meta = load(args)
    extra = [r for path in args.extra_rows for r in read_rows(path)]
    config_problems = get_provider(TRITON).config_problems

    measured: dict[tuple[str, int, str, str], float] = {}
    for r in [*rows, *extra]:
        measured.setdefault((r.spec_key, r.tokens, r.provider, config_key(r.config)), r.median_us)
    buckets: dict[tuple[str, int], list[Measurement]] = defaultdict(list)
    for r in rows:
        buckets[(r.spec_key, r.tokens)].append(r)
    winners = {b: min(rs, key=lambda r: r.median_us) for b, rs in buckets.items()}
    shapes = sorted({shape_of(k) for k, _ in buckets})

    lines = []
    model_r, model_r_measured_only, today_r, restricted_r = [], [], [], []
    missing, per_shape, missing_top = [], [], []
    paired: dict[tuple[str, int], dict[str, float]] = {}
    top_timed, top_hits = 0, dict.fromkeys(range(1, TOP_K + 1), 0)
    warm_trials: list[int] = []
    between: dict[str, list[float | None]] = defaultdict(list)
    warm_hits = {b: 0 for b in BUDGETS}
    sampler_hits, sampler_buckets = dict.fromkeys(BUDGETS, 0), [0]
    for shape in shapes:
        train = [r for r in rows if shape_of(r.spec_key) != shape]
        model = PerfModel(fit_model(train, meta))
        other_keys = sorted({r.spec_key for r in train})
        shape_model, shape_today = [], []
        for (key, tokens), bucket_rows in sorted(buckets.items()):
            if shape_of(key) != shape:
                continue
            spec = RopeSpec.from_key(key)
            best_us = winners[(key, tokens)].median_us
            providers = sorted({r.provider for r in bucket_rows})
            pick = model.best(spec, tokens, providers)
            pick_us = measured.get((key, tokens, pick.provider, config_key(pick.config)))
            if pick_us is None:
                missing.append((key, tokens, pick.provider, config_key(pick.config)))
            else:
                model_r_measured_only.append(pick_us / best_us)
                paired.setdefault((key, tokens), {})["model"] = pick_us / best_us
            # Restricted: the model choosing among what the journal measured in this bucket.
            scored = min(
                bucket_rows, key=lambda r: (model.predict_us(r.provider, spec, tokens, r.config),
                                            config_key(r.config))
            )  # fmt: skip
            restricted_r.append(scored.median_us / best_us)

            # Item 4: this bucket untuned, its spec tuned at tokens/4 and tokens*4.
            around = [(key, t) for t in (tokens // 4, tokens * 4) if (key, t) in winners]
            if len(around) == 2:
                nb = [(winners[b].provider, winners[b].config) for b in around]
                nearest = nb[0]  # equal log distance: the selector takes the smaller bucket
                for label, choice in [("nearest bucket", nearest)] + [
                    (f"model, margin {m}", choose_between_buckets(
                        model, spec, tokens, nb, providers, margin=m))
                    for m in MARGINS
                ]:  # fmt: skip
                    if not isinstance(choice, tuple):
                        choice = (choice.provider, choice.config)
                    us = measured.get((key, tokens, choice[0], config_key(choice[1])))
                    if us is None:
                        missing.append((key, tokens, choice[0], config_key(choice[1])))
                    between[label].append(None if us is None else us / best_us)
            if pick_us is not None:
                model_r.append(pick_us / best_us)
                shape_model.append(pick_us / best_us)

            # Today's rule.
            near = nearest_spec_key(spec, other_keys)
            today_us = None
            if near is not None and (near, tokens) in winners:
                win = winners[(near, tokens)]
                if win.provider != TRITON or not config_problems(spec, win.config):
                    today_us = measured.get((key, tokens, win.provider, config_key(win.config)))
                    if today_us is None:
                        missing.append((key, tokens, win.provider, config_key(win.config)))
                else:  # rejected config: the best recorded provider of the near entry
                    recorded = sorted(
                        (r for r in buckets[(near, tokens)] if r.provider != TRITON),
                        key=lambda r: r.median_us,
                    )
                    fallback = recorded[0].provider if recorded else TRITON
                    cfg = default_triton_config(spec, tokens) if fallback == TRITON else None
                    today_us = measured.get((key, tokens, fallback, config_key(cfg)))
            else:
                cfg = default_triton_config(spec, tokens)
                today_us = measured.get((key, tokens, TRITON, config_key(cfg)))
                if today_us is None:
                    missing.append((key, tokens, TRITON, config_key(cfg)))
            if today_us is not None:
                today_r.append(today_us / best_us)
                paired.setdefault((key, tokens), {})["today"] = today_us / best_us
                shape_today.append(today_us / best_us)

            # Warm start: vendors and the default first (as a study does), then the model's order.
            triton_rows = [r for r in bucket_rows if r.provider == TRITON]
            default = config_key(default_triton_config(spec, tokens))
            order = [r for r in bucket_rows if r.provider != TRITON]
            order += [r for r in triton_rows if config_key(r.config) == default]
            rest = [r for r in triton_rows if config_key(r.config) != default]
            predicted = model.predict_configs(TRITON, spec, tokens, [r.config for r in rest])
            order += [r for _, _, r in sorted(
                zip(predicted, (config_key(r.config) for r in rest), rest, strict=True),
                key=lambda item: item[:2])]  # fmt: skip
            so_far, reached = math.inf, None
            for i, r in enumerate(order, 1):
                so_far = min(so_far, r.median_us)
                if reached is None and so_far <= WITHIN * best_us:
                    reached = i
            warm_trials.append(reached)
            for b in BUDGETS:
                triton_budget = len(order) - len(triton_rows) + b
                if min(r.median_us for r in order[:triton_budget]) <= WITHIN * best_us:
                    warm_hits[b] += 1
            # Today's tuner: the same configs in the order its sampler measured them.
            vendors = [r.median_us for r in bucket_rows if r.provider != TRITON]
            sampled = [r.median_us for r in sorted(triton_rows, key=lambda r: r.measured_at)]
            if all(r.measured_at for r in triton_rows):
                sampler_buckets[0] += 1
                for b in BUDGETS:
                    if min(vendors + sampled[:b]) <= WITHIN * best_us:
                        sampler_hits[b] += 1

            # Warm start over the whole space: the model's top TOP_K of every valid config.
            first = [r.median_us for r in order[: len(order) - len(triton_rows) + 1]]
            top = model.rank_configs(TRITON, spec, tokens, TOP_K)
            top_us = [measured.get((key, tokens, TRITON, config_key(c))) for c in top]
            for c, us in zip(top, top_us, strict=True):
                if us is None and spec.dtype_name == TOP_K_DTYPE:
                    missing_top.append((key, tokens, TRITON, config_key(c)))
            if all(us is not None for us in top_us):
                top_timed += 1
                for k in range(1, TOP_K + 1):
                    if min(first + top_us[:k]) <= WITHIN * best_us:
                        top_hits[k] += 1

        per_shape.append((shape, shape_model, shape_today))

    n = len(winners)
    lines.append(
        f"perf model leave-one-shape-out on {len(rows)} journal rows ({n} buckets, "
        f"{len(shapes)} shapes x bf16/fp16, both dtypes left out together)"
    )
    lines.append("ratio = measured time of the choice / measured best of the bucket (1.0 = best)")
    lines.append("")
    lines.append(summary("model pick, where the journal timed it", model_r_measured_only))
    lines.append(
        f"  model picks the journal never timed: {n - len(model_r_measured_only)}; with today's "
        f"rule's and the between-bucket choices, {len(set(missing))} configs to time on the GPU "
        "(--missing)"
    )
    lines.append(summary("model choosing among the bucket's measured candidates", restricted_r))
    lines.append(summary("today's rule (nearest spec, else Triton default)", today_r))
    both = [v for v in paired.values() if len(v) == 2]
    lines.append(summary("  paired, model pick", [v["model"] for v in both]))
    lines.append(summary("  paired, today's rule", [v["today"] for v in both]))
    lines.append("")
    lines.append("per shape (geomean ratio: model pick where timed | today's rule):")

    def g(v):
        return math.exp(statistics.fmean(map(math.log, v))) if v else float("nan")

    for shape, m, t in per_shape:
        lines.append(
            f"  {shape:32s} model {g(m):.4f} ({len(m):2d} timed, worst "
            f"{max(m, default=float('nan')):.3f}) | today {g(t):.4f} (worst "
            f"{max(t, default=float('nan')):.3f})"
        )
    lines.append("")
    lines.append(
        "warm start: trials until within 2% of the bucket's best (vendors and the Triton default "
        "first, then the bucket's measured Triton configs in the model's order)"
    )
    reached = [t for t in warm_trials if t is not None]
    lines.append(
        f"  median {statistics.median(reached)}, p90 {pct(reached, 90)}, max {max(reached)} "
        f"over {len(reached)} buckets"
    )
    lines.append(
        "  buckets within 2% after k Triton trials (the default, then the model's order; the "
        "vendors before them): " + ", ".join(f"k={b}: {warm_hits[b]}/{n}" for b in BUDGETS)
    )
    lines.append(
        "  the same configs in the order today's sampler measured them (the default first): "
        + ", ".join(f"k={b}: {sampler_hits[b]}/{sampler_buckets[0]}" for b in BUDGETS)
    )
    lines.append(
        f"  over the whole space (vendors, default, then the model's top {TOP_K} of every valid "
        f"config), in the {top_timed} buckets where all {TOP_K} were timed: "
        + ", ".join(f"k={k}: {top_hits[k]}/{top_timed}" for k in top_hits)
        + f"; {len(set(missing_top))} untimed {TOP_K_DTYPE} top-{TOP_K} configs in --missing-top"
    )
    lines.append("")
    lines.append(
        "untuned bucket of a tuned spec (tuned at tokens/4 and tokens*4, model fit without the "
        "shape): measured time of the choice / bucket best, over the choices the journal timed"
    )
    for label, values in between.items():
        timed = [v for v in values if v is not None]
        lines.append("  " + summary(label, timed) + f"; not timed: {len(values) - len(timed)}")
    lines.append(f"\n({time.perf_counter() - started:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.missing:
        with open(args.missing, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["spec", "tokens", "provider", "config"])
            out.writerows(sorted(set(missing)))
    if args.missing_top:
        with open(args.missing_top, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["spec", "tokens", "provider", "config"])
            out.writerows(sorted(set(missing_top) - set(missing)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
