"""How fast does the compile pool compile? (A tuning batch waits for it: 40-45% of a run.)

    python benchmarks/pool_throughput.py --device cuda:0 --workers 1,4,8,15

In the tuner's journal (H200, session 8) a batch's wait grew about linearly with the configs it
compiled, about 53 ms each with 15 workers, where one compile alone takes about 230 ms: the 15
workers compiled only about 4x as fast as one. This times ``autotune.precompile``'s pool on the
same random configs of one spec, each run into an empty Triton cache, in batches of one config
per worker (what the tuner asks), for each worker count and for workers that launch each config
once on the GPU (``launch``, the tuner's) or only compile it (``compile-only``). Workers are
started and warmed up (imports, Triton's source hash) on other configs before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autotune.precompile import TritonPrecompiler
from autotune.search import CandidateSpace
from kernels import RopeSpec

MODES = ("launch", "compile-only")


def cpu_topology() -> str:
    """Logical CPUs, and how many share a core (SMT), from Linux's sysfs."""
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    shared = siblings.read_text().strip() if siblings.exists() else "unknown"
    return f"{os.cpu_count()} logical CPUs; cpu0 shares its core with: {shared}"


def throughput(
    make_pool: Callable[[int, bool], TritonPrecompiler],
    spec: RopeSpec,
    configs: Sequence[dict],
    warmup: Sequence[dict],
    workers: int,
    launch: bool,
) -> tuple[float, list[float]]:
    """Seconds to compile ``configs`` in batches of ``workers``, and each batch's seconds.

    The pool starts and compiles ``warmup`` (2 per worker) into a scratch cache first; the
    timed configs then compile into an empty one."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    with (
        tempfile.TemporaryDirectory() as scratch,
        tempfile.TemporaryDirectory() as measured,
        make_pool(workers, launch) as pool,
    ):
        try:
            os.environ["TRITON_CACHE_DIR"] = scratch  # jobs carry the directory of the moment
            pool(spec, warmup[: 2 * workers])
            os.environ["TRITON_CACHE_DIR"] = measured
            batches = []
            start = time.perf_counter()
            for first in range(0, len(configs), workers):
                batch_start = time.perf_counter()
                pool(spec, configs[first : first + workers])
                batches.append(time.perf_counter() - batch_start)
            return time.perf_counter() - start, batches
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--spec", default="q32_kv8_d128_r128_neox_bfloat16")
    parser.add_argument("--configs", type=int, default=60, help="timed configs per run")
    parser.add_argument("--workers", default="1,4,8,15", help="worker counts, e.g. 1,4,8,15")
    parser.add_argument("--modes", default=",".join(MODES), help="launch, compile-only or both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if any(mode not in MODES for mode in modes):
        parser.error(f"--modes: expected some of {', '.join(MODES)}, got {args.modes!r}")
    worker_counts = [int(w) for w in args.workers.split(",")]
    spec = RopeSpec.from_key(args.spec)
    valid = [dict(c.config) for c in CandidateSpace.build(spec, ["triton"], args.device).valid]
    picked = random.Random(args.seed).sample(valid, min(len(valid), args.configs + 32))
    configs, warmup = picked[: args.configs], picked[args.configs :]

    def make_pool(workers: int, launch: bool) -> TritonPrecompiler:
        return TritonPrecompiler(args.device, workers, launch)

    print(f"{spec.key}, {len(configs)} configs per run; {cpu_topology()}")
    print("mode | workers | seconds | configs/s | batch median (s)")
    for mode in modes:
        for workers in worker_counts:
            seconds, batches = throughput(
                make_pool, spec, configs, warmup, workers, launch=mode == "launch"
            )
            print(
                f"{mode} | {workers} | {seconds:.2f} | {len(configs) / seconds:.1f} | "
                f"{statistics.median(batches):.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
