"""Where a Triton config's first call goes: a tuning trial's gate costs 0.15 s on the H200.

    python benchmarks/first_call.py --device cuda:0 --configs 12 --profile

The same configs of one spec are first-called in three fresh processes (nothing in memory):

1. ``cold``: an empty Triton cache directory, so the first call compiles.
2. ``disk``: the same directory, now holding those kernels, so the first call loads them.
3. ``workers``: another empty directory that ``autotune.precompile``'s worker pool fills first
   (what ``python -m autotune --compile-workers N`` does), then the first calls here.
4. ``compile-only``: the same with workers that compile without launching (host tensors, no
   GPU work): its first calls must find their kernels as well (no cache entries added).

Each prints the median and mean first-call time and how many cache entries the calls added
(none when they hit what was there). ``--profile`` adds a cProfile of the ``disk`` run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autotune.measure import make_inputs
from autotune.precompile import precompile_triton
from autotune.search import CandidateSpace
from kernels import RopeSpec, get_provider

GATE_TOKENS = 101


def sample_configs(spec: RopeSpec, device: str, count: int, seed: int) -> list[dict]:
    """``count`` distinct valid Triton configs for ``spec`` (the tuner's space), at random."""
    valid = [dict(c.config) for c in CandidateSpace.build(spec, ["triton"], device).valid]
    return random.Random(seed).sample(valid, min(count, len(valid)))


def cache_entries(cache_dir: str) -> int:
    return sum(1 for _ in Path(cache_dir).iterdir()) if os.path.isdir(cache_dir) else 0


def child(args: argparse.Namespace) -> None:
    spec = RopeSpec.from_key(args.spec)
    configs = sample_configs(spec, args.device, args.configs, args.seed)
    cache_dir = os.environ["TRITON_CACHE_DIR"]
    if args.child in ("workers", "compile-only"):
        start = time.perf_counter()
        launch = args.child == "workers"
        compiled = precompile_triton(spec, configs, args.device, args.workers, launch)
        print(
            f"  {args.child}: {compiled}/{len(configs)} compiled in "
            f"{time.perf_counter() - start:.2f} s (pool start included); cache entries "
            f"{cache_entries(cache_dir)}"
        )
    inputs = make_inputs(spec, GATE_TOKENS, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda _device: None)
    sync(args.device)
    before = cache_entries(cache_dir)
    profile = cProfile.Profile() if args.profile and args.child == "disk" else None
    seconds = []
    for config in configs:
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        get_provider("triton").bound(spec, config)(*inputs.args)
        sync(args.device)
        seconds.append(time.perf_counter() - start)
        if profile is not None:
            profile.disable()
    print(
        f"{args.child:>8}: first call median {statistics.median(seconds) * 1e3:.1f} ms, "
        f"mean {statistics.mean(seconds) * 1e3:.1f} ms over {len(seconds)} configs; "
        f"cache entries added {cache_entries(cache_dir) - before}"
    )
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--spec", default="q32_kv8_d128_r128_neox_bfloat16")
    parser.add_argument("--configs", type=int, default=12, help="configs to first-call")
    parser.add_argument("--workers", type=int, default=8, help="compile workers (workers run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--child", choices=("cold", "disk", "workers", "compile-only"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    passed = list(sys.argv[1:] if argv is None else argv)
    with (
        tempfile.TemporaryDirectory() as shared,
        tempfile.TemporaryDirectory() as pooled,
        tempfile.TemporaryDirectory() as compiled_only,
    ):
        modes = (
            ("cold", shared),
            ("disk", shared),
            ("workers", pooled),
            ("compile-only", compiled_only),
        )
        for mode, cache_dir in modes:
            env = {**os.environ, "TRITON_CACHE_DIR": cache_dir}
            command = [sys.executable, __file__, *passed, "--child", mode]
            subprocess.run(command, env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
