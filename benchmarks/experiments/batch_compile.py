"""Does asking trials in batches and compiling them together pay? The tuner's studies with
batches of ``autotune.runner.BATCH_TRIALS`` against one trial at a time, on one device.

Each arm runs ``autotune.tune`` for the same spec and buckets in a fresh process with fresh
Triton and Inductor caches and a fresh journal (so each pays its own compiles), seeded alike,
and reports the tuning wall time, the time per study (first trial's start to last trial's end)
and the best time each study found. Run from the repository root::

    PYTHONPATH=$PWD:/tmp/site python benchmarks/experiments/batch_compile.py --device cuda:0 \
        --spec q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24 --tokens 1,256,16384 --batches 1,8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_arm(args: argparse.Namespace) -> dict:
    """One arm, in this process: tune with ``BATCH_TRIALS = args.arm``."""
    import autotune.runner
    from autotune import open_storage, tune
    from kernels import RopeSpec

    autotune.runner.BATCH_TRIALS = args.arm
    storage = open_storage(Path(args.workdir) / "studies.journal")
    providers = args.providers.split(",") if args.providers else None
    start = time.perf_counter()
    table = tune(
        [RopeSpec.from_key(args.spec)], [int(t) for t in args.tokens.split(",")],
        device=args.device, providers=providers, trials=args.trials, storage=storage,
        seed=args.seed, progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    studies = {}
    for summary in storage.get_all_studies():
        trials = [
            t for t in storage.get_all_trials(summary._study_id, deepcopy=False)
            if t.datetime_start and t.datetime_complete
        ]  # fmt: skip
        if not trials or "tokens" not in summary.user_attrs:
            continue
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        studies[str(summary.user_attrs["tokens"])] = round((last - first).total_seconds(), 2)
    best = {
        tokens: (entry["provider"], round(entry["median_us"], 3))
        for tokens, entry in next(iter(table["entries"]["graph"].values())).items()
    }
    return {"batch": args.arm, "wall_s": round(wall, 1), "study_s": studies, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--spec", default="q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24")
    parser.add_argument("--tokens", default="1,256,16384")
    parser.add_argument("--providers", default="", help="default: every provider that runs")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", default="1,8", help="the arms' BATCH_TRIALS, in order")
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm is not None:
        sys.stdout.buffer.write(orjson.dumps(run_arm(args)) + b"\n")
        return

    import torch

    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    print(f"spec: {args.spec}; tokens {args.tokens}; {args.trials} trials; seed {args.seed}")
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        with tempfile.TemporaryDirectory() as workdir:
            env = {
                **os.environ,
                "TRITON_CACHE_DIR": f"{workdir}/triton",
                "TORCHINDUCTOR_CACHE_DIR": f"{workdir}/inductor",
            }
            argv = [sys.executable, __file__, "--arm", str(batch), "--workdir", workdir]
            for name in ("device", "spec", "tokens", "providers", "trials", "seed"):
                argv += [f"--{name}", str(getattr(args, name))]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"batch {batch}: exit {done.returncode}\n{done.stderr[-3000:]}")
                continue
            result = orjson.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(orjson.dumps(result).decode(), flush=True)
    if len(results) == 2:
        a, b = results
        print(
            f"wall: batch {a['batch']} {a['wall_s']} s, batch {b['batch']} {b['wall_s']} s "
            f"({a['wall_s'] / b['wall_s']:.2f}x)"
        )
        for tokens in a["best"]:
            if tokens in b["best"]:
                ratio = b["best"][tokens][1] / a["best"][tokens][1]
                print(
                    f"{tokens} tokens: best {a['best'][tokens]} vs {b['best'][tokens]}: {ratio:.3f}"
                )


if __name__ == "__main__":
    main()
