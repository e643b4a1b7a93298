"""Does compiling in the background disturb a measurement? (``python -m autotune
--compile-overlap`` times one batch while the workers compile the next.)

    python benchmarks/overlap_check.py --device cuda:0

Times Triton configs of one spec at a few token counts with the tuner's own measurement (graph
replay, 10 rounds), three times each: on a quiet machine, while other processes are busy, and
quiet again. Prints per token count the median over configs of busy/quiet (the effect) next to
quiet/quiet (the noise floor).

``--busy compile``: ``autotune.precompile``'s workers compile configs of other specs (and, as
they do, launch each once on the GPU). ``--busy compile-only``: the same workers compiling
without launching (host tensors, no GPU work). ``--busy spin``: as many processes, at the same
priority, only burn CPU; no CUDA. On the H200, busy compiles made timings read 2.5-4% (1 token)
and 5-7% (256 tokens) faster (sessions 8 and 9), compile-only workers and spinners left them
within 0.4% (session 9): the workers' GPU work does it, not the CPU load. So the tuner's
``--compile-overlap`` uses compile-only workers.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import random
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autotune.measure import time_rope
from autotune.precompile import _NICE, TritonPrecompiler
from autotune.search import SEARCH_REPEATS, CandidateSpace
from autotune.tune import default_compile_workers
from kernels import RopeSpec, get_provider

# Specs whose configs keep the workers busy: none is the timed one, so nothing is served from
# the cache the timed process uses.
_BUSY_SPECS = (
    "q16_kv8_d256_r256_neox_float16",
    "q32_kv32_d128_r32_neox_float16",
    "q64_kv8_d128_r128_neox_float16",
    "q128_kv1_d64_r64_gptj_float16",
)


def valid_configs(spec: RopeSpec, device: str) -> list[dict]:
    """Every valid Triton config for ``spec`` (the tuner's space)."""
    return [dict(c.config) for c in CandidateSpace.build(spec, ["triton"], device).valid]


def _spin(
    ready: multiprocessing.synchronize.Semaphore,
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Burn CPU while ``go`` is set, at the compile workers' priority, until ``stop``."""
    os.nice(_NICE)
    ready.release()
    while not stop.is_set():
        if go.wait(0.05):
            count = 0
            while go.is_set():
                for _ in range(10_000):
                    count += 1


@contextlib.contextmanager
def compile_load(device: str, workers: int, seed: int, launch: bool = True) -> Iterator[Callable]:
    """Yields ``busy()``: a context manager in which ``workers`` compile processes are busy
    (launching each config once on ``device``, or with ``launch=False`` only compiling)."""
    busy_work = [
        (busy, config)
        for busy in map(RopeSpec.from_key, _BUSY_SPECS)
        for config in valid_configs(busy, device)
    ]
    random.Random(seed).shuffle(busy_work)
    busy_queue = iter(busy_work)
    with TritonPrecompiler(device, workers, launch) as pool:
        first_spec, first_config = next(busy_queue)
        pool(first_spec, [first_config])  # start the pool outside any measurement

        @contextlib.contextmanager
        def busy() -> Iterator[None]:
            batch = [next(busy_queue) for _ in range(2 * workers)]
            handles = [pool.submit(spec, [config]) for spec, config in batch]
            yield
            for handle in handles:
                handle.wait()

        yield busy


@contextlib.contextmanager
def spin_load(workers: int, start_timeout_s: float = 120.0) -> Iterator[Callable]:
    """Yields ``busy()``: a context manager in which ``workers`` processes burn CPU. They are
    started (and past their imports) before it yields."""
    context = multiprocessing.get_context("spawn")
    ready, go, stop = context.Semaphore(0), context.Event(), context.Event()
    spinners = [
        context.Process(target=_spin, args=(ready, go, stop), daemon=True) for _ in range(workers)
    ]
    for process in spinners:
        process.start()

    @contextlib.contextmanager
    def busy() -> Iterator[None]:
        go.set()
        try:
            yield
        finally:
            go.clear()

    try:
        for _ in spinners:
            if not ready.acquire(timeout=start_timeout_s):
                raise RuntimeError(f"spin_load: a spinner did not start in {start_timeout_s} s")
        yield busy
    finally:
        stop.set()
        go.clear()
        for process in spinners:
            process.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--spec", default="q32_kv8_d128_r128_neox_bfloat16")
    parser.add_argument("--tokens", default="1,256,16384", help="e.g. 1,256,16384")
    parser.add_argument("--configs", type=int, default=8, help="timed configs per token count")
    parser.add_argument("--workers", type=int, default=None, help="default: the tuner's")
    parser.add_argument(
        "--busy",
        choices=("compile", "compile-only", "spin"),
        default="compile",
        help="what keeps the CPU busy",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)  # the timed configs, the same under either load
    spec = RopeSpec.from_key(args.spec)
    workers = args.workers or default_compile_workers(args.device) or 1
    triton = get_provider("triton")

    def measure(config: dict, tokens: int) -> float:
        fn = triton.bound(spec, config)
        return time_rope(
            fn, spec, tokens, args.device, repeats=SEARCH_REPEATS, seed=args.seed
        ).median_us

    print(f"{spec.key}, {workers} {args.busy} workers, {SEARCH_REPEATS} rounds per measurement")
    print("tokens | configs | busy / quiet (median, min, max) | quiet / quiet (median, min, max)")
    if args.busy == "spin":
        load = spin_load(workers)
    else:
        load = compile_load(args.device, workers, args.seed, launch=args.busy == "compile")
    with load as busy:
        for tokens in (int(t) for t in args.tokens.split(",")):
            effect, noise = [], []
            for config in rng.sample(valid_configs(spec, args.device), args.configs):
                measure(config, tokens)  # compile and load outside the comparison
                quiet = measure(config, tokens)
                with busy():
                    busy_us = measure(config, tokens)
                quiet_again = measure(config, tokens)
                effect.append(busy_us / quiet)
                noise.append(quiet_again / quiet)
            print(
                f"{tokens} | {len(effect)} | {statistics.median(effect):.4f} ({min(effect):.4f}, "
                f"{max(effect):.4f}) | {statistics.median(noise):.4f} ({min(noise):.4f}, "
                f"{max(noise):.4f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
