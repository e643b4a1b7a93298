"""Host time of one eager call (back-to-back calls, 4 tokens, no synchronization in between).

    python benchmarks/launch_overhead.py --device cuda:0

The Triton provider's lean launch is compared with vLLM's op, FlashInfer's wrapper, a plain
``kernel[grid](...)`` launch of the same kernel, and a bare ``torch.add_``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import RopeSpec, get_provider, list_providers
from kernels.measure import make_inputs
from kernels.providers import launch_hooks_active, launch_rope


def host_us(fn, calls: int = 2000, rounds: int = 15) -> float:
    """Median over rounds of wall time per call; GPU work is tiny, so this is host time."""
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args(argv)
    spec = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
    x = make_inputs(spec, args.tokens, args.device)
    a = x.args
    available = {s.name for s in list_providers(args.device) if s.available}
    results = {}
    for name in ("vllm", "flashinfer", "triton"):
        if name in available:
            fn = get_provider(name).callable_for(spec, None)
            results[name] = host_us(lambda fn=fn: fn(*a))
    config = get_provider("triton").check_config(spec, None)
    results["triton kernel[grid]"] = host_us(lambda: launch_rope(*a, spec, config), calls=300)
    results["triton apply (checks)"] = host_us(
        lambda: get_provider("triton").apply(*a, head_size=128, is_neox=True)
    )
    y = torch.randn(args.tokens, 4096, device=args.device)
    results["torch.add_"] = host_us(lambda: y.add_(1.0))
    if "triton" in available:  # where the lean path's time goes
        launcher = get_provider("triton").callable_for(spec, None)
        print(
            f"lean cache entries: {len(launcher.compiled)}; launch hooks active: "
            f"{launch_hooks_active()}"
        )
        if launcher.compiled:
            compiled, grid_h = next(iter(launcher.compiled.values()))
            grid_t = launcher.geometry.token_blocks(args.tokens)
            q, k = x.query, x.key
            run_args = (
                x.positions,
                q,
                k,
                x.cos_sin_cache,
                args.tokens,
                q.stride(0),
                128,
                k.stride(0),
                128,
                x.cos_sin_cache.stride(0),
                *launcher.constexprs.values(),
                spec.num_kv_heads,
            )
            stream = torch.cuda.current_stream().cuda_stream
            results["compiled.run direct"] = host_us(
                lambda: compiled.run(
                    grid_t,
                    grid_h,
                    1,
                    stream,
                    compiled.function,
                    compiled.packed_metadata,
                    None,
                    None,
                    None,
                    *run_args,
                )
            )
            results["launch hooks check"] = host_us(launch_hooks_active)
            results["raw stream lookup"] = host_us(lambda: torch._C._cuda_getCurrentRawStream(0))
    for name, us in results.items():
        print(f"{name:24s} {us:7.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
