"""Host time per eager call: ``select_rope``'s callable vs the chosen provider's own callable.

Both are called back to back (no synchronization inside the timed loop) on the same inputs, so
the difference is what the selector adds on the host: its per-call argument checks plus the
dispatch. The checks alone are timed too. Rounds alternate between the callables to cancel
drift; the medians over rounds are reported. With ``$OUT`` set, the report is also written to
``$OUT/selector_overhead.txt``.

    python benchmarks/selector_overhead.py --device cuda:0 --max-overhead-us 1.0
    python benchmarks/selector_overhead.py --device cpu --calls 200   # smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kernels import cos_sin_cache, get_provider, parse_dtype, select_rope


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="e.g. cuda:0 or cpu")
    parser.add_argument("--tokens", type=int, default=4, help="tokens per call (default 4)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per callable")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--rotary-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--is-neox-style", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16, float32")
    parser.add_argument("--provider", default=None, help="force a provider (default: table)")
    parser.add_argument(
        "--timing", choices=("graph", "eager"), default="eager", help="table entries to follow"
    )
    parser.add_argument(
        "--max-overhead-us",
        type=float,
        default=None,
        help="exit with status 1 when the overhead is above this (e.g. 1.0)",
    )
    return parser.parse_args(argv)


def host_us_per_call(fn: Callable, args: tuple, calls: int, sync: Callable[[], None]) -> float:
    """Wall time per call of ``calls`` back-to-back calls; the device drains outside the timing."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    rope = select_rope(
        args.head_size,
        args.rotary_dim,
        args.num_heads,
        args.num_kv_heads,
        args.is_neox_style,
        dtype,
        device,
        provider=args.provider,
        timing=args.timing,
    )
    choice = rope.explain(args.tokens)
    direct = get_provider(choice.provider).callable_for(rope.spec, choice.config)
    checks = rope._check  # the selector's per-call argument checks, alone

    n, d = args.tokens, args.head_size
    qkv = torch.randn(n, (args.num_heads + 2 * args.num_kv_heads) * d, device=device, dtype=dtype)
    query = qkv[:, : args.num_heads * d]
    key = qkv[:, args.num_heads * d : (args.num_heads + args.num_kv_heads) * d]
    cache = cos_sin_cache(4096, args.rotary_dim, device=device)
    positions = torch.randint(0, 4096, (n,), device=device)
    call_args = (positions, query, key, cache)
    rope.check(*call_args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    callables = {"direct": direct, "selector": rope, "checks": checks}
    if choice.provider == "vllm":  # its library is loaded: vLLM's op as vLLM's layers call it
        op, neox = torch.ops._C.rotary_embedding, args.is_neox_style
        callables["vllm_op"] = lambda p, q, k, c: op(p, q, k, d, c, neox)
    for fn in callables.values():
        for _ in range(args.warmup):
            fn(*call_args)
    times: dict[str, list[float]] = {name: [] for name in callables}
    for round_ in range(args.rounds):
        order = list(callables.items())
        for name, fn in order if round_ % 2 == 0 else reversed(order):
            times[name].append(host_us_per_call(fn, call_args, args.calls, sync))

    median = {name: statistics.median(values) for name, values in times.items()}
    paired = statistics.median(
        s - t for s, t in zip(times["selector"], times["direct"], strict=True)
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        str(choice),
        f"device: {device} ({name}); {n} tokens; median of {args.rounds} rounds x "
        f"{args.calls} calls",
        f"provider {choice.provider} callable (no checks): {median['direct']:8.3f} us/call",
        f"select_rope callable (checked): {median['selector']:8.3f} us/call",
        f"  of which the per-call checks:  {median['checks']:8.3f} us/call",
        f"selector overhead (checks + dispatch): {median['selector'] - median['direct']:8.3f} "
        f"us/call (median of paired rounds: {paired:.3f} us)",
    ]
    if "vllm_op" in median:
        lines.append(f"vLLM's op called directly:      {median['vllm_op']:8.3f} us/call")
    report = "\n".join(lines)
    print(report)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "selector_overhead.txt"), "a") as f:
            f.write(report + "\n\n")
    if args.max_overhead_us is not None and paired > args.max_overhead_us:
        print(f"overhead above {args.max_overhead_us} us", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
