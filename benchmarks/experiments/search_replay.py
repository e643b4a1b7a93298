"""Replay the tuner's sampler on a recorded sweep: how often does a search of N trials find a
Triton config faster than FlashInfer and vLLM, at points where such configs exist?

No GPU: every trial looks its time up in a ``roofline.py --sweep`` CSV. The sampler is the
tuner's (TPE, multivariate, grouped, constant liar, the same startup count) and the study's
first trial is the token-aware default, as in a real study; but the space is the sweep's axes
(configs the sweep did not time cannot be replayed), so the result is a bound on what the
search finds in the full space with the same budget.

    python benchmarks/experiments/search_replay.py benchmarks/results/roofline_losing_h200.csv \
        --trials 20,48
"""

from __future__ import annotations

import argparse
import ast
import collections
import csv
import statistics
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autotune.sampler import make_sampler
from kernels import RopeSpec
from kernels.providers import default_triton_config

Point = tuple[str, int]  # (spec key, tokens)
ConfigKey = tuple[tuple[str, int], ...]


def load_sweep(path: Path) -> tuple[dict[Point, dict[ConfigKey, float]], dict[Point, float]]:
    """Per point: the Triton configs' medians, and the faster of FlashInfer and vLLM."""
    triton: dict[Point, dict[ConfigKey, float]] = collections.defaultdict(dict)
    others: dict[Point, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            point = (row["spec_key"], int(row["tokens"]))
            median = float(row["median_us"])
            if row["provider"] == "triton" and row["config"].startswith("{'"):
                key = tuple(sorted(ast.literal_eval(row["config"]).items()))
                triton[point][key] = min(median, triton[point].get(key, median))
            elif row["provider"] in ("flashinfer", "vllm"):
                others[point] = min(median, others.get(point, median))
    return triton, others


def replay(times: dict[ConfigKey, float], first: dict, trials: int, seed: int) -> float:
    """The best time a study of ``trials`` timed configs finds, sampling the sweep's axes."""
    seen: dict[str, set[int]] = collections.defaultdict(set)
    for key in times:
        for name, value in key:
            seen[name].add(value)
    axes = {name: sorted(values) for name, values in seen.items()}
    study = optuna.create_study(sampler=make_sampler(trials, seed))
    if tuple(sorted(first.items())) in times:
        study.enqueue_trial({name: axes[name].index(first[name]) for name in axes})
    best, timed = float("inf"), 0
    while timed < trials:
        trial = study.ask()
        config = {n: v[trial.suggest_int(n, 0, len(v) - 1)] for n, v in axes.items()}
        median = times.get(tuple(sorted(config.items())))
        if median is None:  # not in the sweep (invalid there): costs no budget, as in a study
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, median)
        timed += 1
        best = min(best, median)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="a roofline.py --sweep CSV")
    parser.add_argument("--trials", default="20,48", help="study budgets, e.g. 20,48")
    parser.add_argument("--seeds", type=int, default=20, help="replays per budget, e.g. 20")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runs = [int(t) for t in args.trials.split(",")]

    triton, others = load_sweep(args.sweep)
    print("point | sweep best | FlashInfer/vLLM | " + " | ".join(
        f"{t} trials: mean gap, runs beating them" for t in runs
    ))  # fmt: skip
    gaps: dict[int, list[float]] = collections.defaultdict(list)
    for (key, tokens), times in triton.items():
        best, rival = min(times.values()), others[(key, tokens)]
        first = default_triton_config(RopeSpec.from_key(key), tokens)
        cells = []
        for budget in runs:
            found = [replay(times, first, budget, seed) for seed in range(args.seeds)]
            gap = statistics.mean(f / best - 1 for f in found)
            gaps[budget].append(gap)
            beats = sum(f < rival for f in found)
            cells.append(f"{100 * gap:+.1f}%, {beats}/{args.seeds}")
        print(f"{key} {tokens} | {best:.2f} us | {rival:.2f} us | " + " | ".join(cells))
    print("mean gap over the points | | | " + " | ".join(
        f"{100 * statistics.mean(gaps[run]):+.2f}%" for run in runs
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
