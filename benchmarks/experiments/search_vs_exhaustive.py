"""Does the search earn its keep? The tuner's search in its default trial budget against an
exhaustive sweep of every valid Triton config, on a few specs and token counts.

For each (spec, tokens): every valid config is gated and timed once (the sweep); then the
tuner's own study (TPE, enqueued default first) runs with the budget, once per seed. The search's
pick is scored by the sweep's time for the same config, so both sides are compared on one
set of measurements. Reported: the default config's and the search's gap to the sweep's best,
the search pick's rank in the sweep, and the evaluations each needed.

GPU::

    python benchmarks/experiments/search_vs_exhaustive.py --device cuda:0 \
        --json search_vs_exhaustive.json

CPU smoke check (Triton under the interpreter; tiny spec, part of the space)::

    TRITON_INTERPRET=1 python benchmarks/experiments/search_vs_exhaustive.py --device cpu \\
        --spec q2_kv1_d16_r16_neox_float32 --tokens 8 --trials 6 --sweep-limit 24 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import optuna
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autotune._device import resolve_device
from autotune.objective import Objective
from autotune.runner import StudyRunner
from autotune.space import CandidateSpace
from autotune.tuning import DEFAULT_TRIALS
from kernels import RopeSpec, get_provider
from kernels.measure import GATE_TOKENS, check_correct, time_rope
from kernels.table import device_metadata

DEFAULT_SPECS = (
    "q32_kv8_d128_r128_neox_bfloat16",  # Llama-3 8B
    "q16_kv16_d256_r64_gptj_bfloat16",  # GPT-J 6B: partial rotary, GPT-J style
    "q32_kv32_d80_r32_neox_float16",  # Phi-2: head 80
)
DEFAULT_TOKENS = (1, 256, 16384)


def sweep(spec: RopeSpec, tokens: int, device, space: CandidateSpace, limit, mode, time_kwargs):
    """Median time of every valid triton config (None for those failing the gate)."""
    provider = get_provider("triton")
    times = {}
    candidates = [c for c in space.valid if c.provider == "triton"]
    for candidate in candidates[:limit]:
        fn = provider.callable_for(spec, candidate.config)
        try:
            check_correct(fn, spec, GATE_TOKENS, device)
            times[candidate.key] = time_rope(
                fn, spec, tokens, device, mode=mode, **time_kwargs
            ).median_us
        except (AssertionError, RuntimeError) as exc:
            logging.info("sweep: %s failed: %s", dict(candidate.config), exc)
            times[candidate.key] = None
    return times


def search(spec, tokens, device, trials, seed, mode, time_kwargs):
    """The tuner's study for one bucket; its best config and how many trials it took."""
    metadata = device_metadata(device)
    runner = StudyRunner(
        optuna.storages.InMemoryStorage(), Objective(device, seed, time_kwargs), metadata,
        trials, seed,
    )  # fmt: skip
    key = runner.key(mode, spec, tokens, ("triton",))
    runner.run(key)
    study = optuna.load_study(study_name=key.name, storage=runner.storage)
    trials = study.get_trials(deepcopy=False)
    measured = [t for t in trials if t.user_attrs.get("outcome") == "measured"]
    best = min(measured, key=lambda t: t.user_attrs["median_us"])
    best_key = ("triton", tuple(sorted(best.user_attrs["config"].items())))
    return best_key, len(measured), len(trials)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="e.g. --device cuda:0")
    parser.add_argument(
        "--spec",
        action="append",
        help="spec key, repeatable, e.g. --spec "
        "q32_kv8_d128_r128_neox_bfloat16 (default: Llama-3 8B, GPT-J, Phi-2)",
    )
    parser.add_argument(
        "--tokens",
        default=",".join(map(str, DEFAULT_TOKENS)),
        help="token counts, e.g. --tokens 1,256,16384",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help=f"search budget, e.g. --trials 48 (default: {DEFAULT_TRIALS})",
    )
    parser.add_argument("--seeds", default="0,1,2", help="search seeds, e.g. --seeds 0,1,2")
    parser.add_argument(
        "--timing",
        default="graph",
        choices=("graph", "eager"),
        help="timing mode, e.g. --timing eager",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per measurement, e.g. --repeats 3 for a smoke run",
    )
    parser.add_argument(
        "--sweep-limit",
        type=int,
        default=None,
        help="sweep only the first N valid configs (a search pick outside them is timed "
        "on its own), e.g. --sweep-limit 24 for a CPU smoke run (default: all)",
    )
    parser.add_argument("--json", default=None, help="also write results, e.g. --json out.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    device = resolve_device(args.device)
    time_kwargs = {}
    if args.repeats is not None:
        time_kwargs.update(repeats=args.repeats, min_round_s=0.0)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    header = (
        f"{'spec':<34}{'tokens':>7}  {'configs':>7}  {'best_us':>9}  {'default':>8}  "
        f"{'search gap (median, worst)':>27}  {'rank':>9}  {'evals search/sweep':>19}"
    )
    print(header)
    for spec_key in args.spec or DEFAULT_SPECS:
        spec = RopeSpec.from_key(spec_key)
        space = CandidateSpace.build(spec, ["triton"], device)
        for tokens in (int(t) for t in args.tokens.split(",")):
            times = sweep(spec, tokens, device, space, args.sweep_limit, args.timing, time_kwargs)
            swept = len(times)
            ok = {k: v for k, v in times.items() if v is not None}

            def score(key, ok=ok, spec=spec, tokens=tokens):
                """The sweep's time for a config; one outside a partial sweep is timed now."""
                if key not in ok:
                    fn = get_provider("triton").callable_for(spec, dict(key[1]))
                    ok[key] = time_rope(
                        fn, spec, tokens, device, mode=args.timing, **time_kwargs
                    ).median_us
                return ok[key]

            default = get_provider("triton").default_config(spec, tokens)
            default_us = score(("triton", tuple(sorted(default.items()))))
            gaps, picks, evals, asks = [], [], [], []
            for seed in seeds:
                best_key, n_measured, n_asks = search(
                    spec, tokens, device, args.trials, seed, args.timing, time_kwargs
                )
                picks.append(score(best_key))
                evals.append(n_measured)
                asks.append(n_asks)
            best = min(ok.values())
            ranking = sorted(ok.values())
            gaps = [picked / best - 1 for picked in picks]
            ranks = [ranking.index(picked) + 1 for picked in picks]
            row = {
                "spec": spec_key, "tokens": tokens, "valid_configs": len(space.valid),
                "swept": swept, "best_us": best, "default_gap": default_us / best - 1,
                "search_gaps": gaps, "search_ranks": ranks, "search_measured": evals,
                "search_trials": asks, "seeds": seeds, "budget": args.trials,
            }  # fmt: skip
            results.append(row)
            print(
                f"{spec_key:<34}{tokens:>7}  {swept:>7}  {best:>9.2f}  "
                f"{row['default_gap']:>+7.1%}  "
                f"{statistics.median(gaps):>+12.1%} {max(gaps):>+12.1%}  "
                f"{statistics.median(ranks):>4.0f}/{len(ok):<4}  "
                f"{statistics.median(evals):>8.0f}/{swept:<8}"
            )
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            {"device": device_metadata(device), "results": results}, option=orjson.OPT_INDENT_2
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
