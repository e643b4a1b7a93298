"""How far the unseen shapes' picks are from the best config that could have been picked.

For each case of ``benchmarks/unseen_shapes.py``: ``select_rope``'s choice with the shipped table
and model, the device's model's ``--top`` Triton configs at the case's exact token count, both
vendors, each gated against the float64 reference and timed by CUDA-graph replay. The best of
them all (the "oracle") bounds what a better model could reach with today's kernel.

The oracle takes the fastest of about 15 timings, each off by its measurement noise, so it is
biased low. ``--recheck N`` measures that bias: after the first pass, each case's selection and
its oracle winner are timed again in N alternating rounds on fresh inputs, and the report gives
the winner's advantage in both passes.

    python benchmarks/experiments/unseen_oracle.py --device cuda:0 --top 12 --recheck 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import get_provider
from kernels.compile_ahead import compile_ahead
from kernels.measure import check_correct, time_rope
from kernels.perf_model import PerfModel, model_file_name
from kernels.table import hardware_metadata, shipped_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unseen_shapes import _available, cases, geomean, selector_for, short_tag, write_csv


def recheck(fns: dict, winner: str, case, device: str, args) -> dict:
    """The selection and the first pass's winner timed again, alternating, ``args.recheck``
    rounds each on fresh inputs: the medians and the winner's advantage."""
    if winner == "select_rope":
        return {"recheck_select_us": None, "recheck_winner_us": None, "recheck_gain": 1.0}
    laps: dict[str, list[float]] = {"select_rope": [], winner: []}
    for _ in range(args.recheck):
        for name in laps:
            laps[name].append(
                time_rope(
                    fns[name], case.spec, case.tokens, device, with_key=case.with_key,
                    repeats=args.repeats,
                ).median_us
            )  # fmt: skip
    sel, win = statistics.median(laps["select_rope"]), statistics.median(laps[winner])
    return {"recheck_select_us": sel, "recheck_winner_us": win, "recheck_gain": sel / win}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--recheck", type=int, default=0, help="rounds of the second pass")
    args = parser.parse_args()
    device, table_dir = args.device, shipped_config_dir()
    device_name = hardware_metadata(device)["device_name"]
    print(f"device: {device_name}", flush=True)
    model = PerfModel.load(Path(table_dir) / model_file_name(device_name))
    triton = get_provider("triton")
    plan = []
    for case in cases():
        s = case.spec
        rope = selector_for(s, device, table_dir)
        ranked = model.rank_configs("triton", s, case.tokens, args.top)
        fns = [("select_rope", None, rope)]
        fns += [(f"triton#{i}", c, triton.callable_for(s, c)) for i, c in enumerate(ranked)]
        for name in ("flashinfer", "vllm"):
            if _available(name, device, s, case.with_key):
                fns.append((name, None, get_provider(name).callable_for(s, None)))
        plan.append((case, rope, fns))
    jobs = [(fn, case.spec, False) for case, _, fns in plan for _, _, fn in fns[1:]]
    print(f"compiles started ahead: {compile_ahead(jobs, device, 101)}", flush=True)

    rows, out = [], os.environ.get("OUT")
    for case, rope, fns in plan:
        times = {}
        for name, _, fn in fns:
            check_correct(fn, case.spec, case.tokens, device, keyless=not case.with_key, seed=1)
            times[name] = time_rope(
                fn, case.spec, case.tokens, device, with_key=case.with_key, repeats=args.repeats
            ).median_us
        tritons = {n: t for n, t in times.items() if n.startswith("triton#")}
        vendor = min((times[n] for n in ("flashinfer", "vllm") if n in times), default=None)
        best_triton = min(tritons, key=tritons.get)
        winner = min(times, key=times.get)
        choice = rope.explain(case.tokens, has_key=case.with_key)
        rows.append({
            "model": case.model, "spec": case.spec.key, "key": case.with_key,
            "tokens": case.tokens, "choice": f"{choice.provider} {dict(choice.config)}",
            "select_rope_us": times["select_rope"], "model_top1_us": times["triton#0"],
            "best_triton": best_triton, "best_triton_us": tritons[best_triton],
            "best_triton_config": fns[1 + int(best_triton[7:])][1],
            "flashinfer_us": times.get("flashinfer"), "vllm_us": times.get("vllm"),
            "oracle_us": min(times.values()),
            "select_rope_x": vendor / times["select_rope"] if vendor else None,
            "oracle_x": vendor / min(times.values()) if vendor else None,
            "oracle_winner": winner,
            "first_pass_gain": times["select_rope"] / times[winner],
        })  # fmt: skip
        if args.recheck:
            rows[-1].update(recheck({n: f for n, _, f in fns}, winner, case, device, args))
        r = rows[-1]
        print(
            f"{r['model'][:28]:28} {r['tokens']:>6} sel {r['select_rope_us']:8.2f} "
            f"top1 {r['model_top1_us']:8.2f} best {r['best_triton']:>9} {r['best_triton_us']:8.2f} "
            f"fi {r['flashinfer_us'] or 0:8.2f} vllm {r['vllm_us'] or 0:8.2f} "
            f"sel_x {r['select_rope_x'] or 0:.3f} oracle_x {r['oracle_x'] or 0:.3f} "
            f"gain {r['first_pass_gain']:.3f} recheck {r.get('recheck_gain') or 0:.3f}",
            flush=True,
        )
        if out:  # after each case: a run cut short keeps what it measured
            write_csv(Path(out, f"unseen_oracle_{short_tag(device_name)}.csv"), rows)
    columns = ["select_rope_x", "oracle_x", "first_pass_gain"]
    columns += ["recheck_gain"] if args.recheck else []
    for col in columns:
        xs = [r[col] for r in rows if r[col]]
        if not xs:
            continue
        print(f"{col}: geomean {geomean(xs):.3f}, worst {min(xs):.3f}, below 0.97: "
              f"{sum(x < 0.97 for x in xs)} of {len(xs)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
