"""RoPE kernels against the memory roofline: per spec and token count, each provider's median,
achieved TB/s and % of the floor (bytes over the measured copy bandwidth), plus, for partial
rotary, the access pattern's own ceiling: a copy kernel that reads and writes exactly the
rotated slices, tiled and swept like the RoPE kernel.

    python benchmarks/roofline.py --device cuda:0 --out benchmarks/results/roofline_h200.csv
    python benchmarks/roofline.py --device cuda:0 --sweep   # also sweep Triton configs
    python benchmarks/roofline.py --specs llama-3-70b:tp8,q8_kv1_d64_r64_gptj_bfloat16

Specs are model presets of ``autotune.models.MODEL_PRESETS`` (``NAME`` at tensor parallel 1,
``NAME:tpN`` at N) or table spec keys.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autotune.models import MODEL_PRESETS
from kernels import RopeSpec, get_provider, list_providers
from kernels.measure import check_correct, copy_bandwidth, time_rope
from kernels.providers import TritonGeometry
from kernels.table import library_versions

# vLLM's benchmark_rope.py spec (head 128, rotary 32, 32 and 48 heads), then model presets.
DEFAULT_SPECS = (
    "q32_kv32_d128_r32_neox_bfloat16",
    "q48_kv48_d128_r32_neox_bfloat16",
    "llama-3-8b",
    "llama-3-70b:tp8",
    "gpt-j-6b",
    "pythia-6.9b",
    "gemma-2-9b",
    "qwen2.5-7b",
    "deepseek-v2",
)
TOKENS = (1, 16, 256, 2048, 4096, 16384, 32768, 65536)


def resolve_spec(name: str, dtype: torch.dtype) -> RopeSpec:
    """A preset of :data:`autotune.models.MODEL_PRESETS` (``llama-3-8b``, at tensor parallel 1,
    or ``llama-3-70b:tp8``), or a spec key such as ``q64_kv8_d128_r128_neox_bfloat16`` (as in
    the tuning tables), in ``dtype``.

    Raises:
        SystemExit: ``name`` is neither, or its tensor-parallel size does not fit the preset.
    """
    preset, _, tp = name.partition(":tp")
    if preset.lower() in MODEL_PRESETS:
        try:
            (spec,) = MODEL_PRESETS[preset.lower()].specs([dtype], [int(tp or 1)])
        except ValueError as exc:
            raise SystemExit(f"--specs: {name!r}: {exc}") from None
        return spec
    try:
        return dataclasses.replace(RopeSpec.from_key(name), dtype=dtype)
    except ValueError:
        raise SystemExit(
            f"--specs: {name!r} is neither a spec key nor a preset (NAME or NAME:tpN) of "
            f"{sorted(MODEL_PRESETS)}"
        ) from None


@triton.jit
def _slice_copy_kernel(
    x_ptr,
    num_tokens,
    stride_t,
    stride_h,
    NUM_HEADS: tl.constexpr,
    ROT: tl.constexpr,  # rotated elements per head (the slice copied)
    ROT_PAD: tl.constexpr,  # ROT rounded up to a power of two
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # heads per inner step
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    t = t.to(tl.int64)
    d = tl.arange(0, ROT_PAD)
    for hb in range(0, tl.cdiv(NUM_HEADS, BLOCK_H)):
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = t_mask[:, None, None] & (h < NUM_HEADS)[None, :, None] & (d < ROT)[None, None, :]
        p = x_ptr + t[:, None, None] * stride_t + h[None, :, None] * stride_h + d[None, None, :]
        tl.store(p, tl.load(p, mask=mask), mask=mask)


def slice_copy_geometry(spec: RopeSpec, block_t: int, block_h: int) -> TritonGeometry:
    """The copy kernel's tiles: the RoPE kernel's with one program per token block."""
    return TritonGeometry(spec, block_t, block_h, head_split=1)


def slice_copy_fn(spec: RopeSpec, block_t: int, block_h: int, num_warps: int):
    """A callable with the RoPE signature that copies the rotated slices of q and k in place."""
    geometry = slice_copy_geometry(spec, block_t, block_h)

    def run(positions, query, key, cos_sin_cache):
        n = positions.numel()
        for x, heads in ((query, spec.num_heads), (key, spec.num_kv_heads)):
            _slice_copy_kernel[(geometry.token_blocks(n),)](
                x,
                n,
                x.stride(0),
                spec.head_size,
                NUM_HEADS=heads,
                ROT=spec.rotary_dim,
                ROT_PAD=geometry.row,
                BLOCK_T=block_t,
                BLOCK_H=block_h,
                num_warps=num_warps,
            )

    return run


# Below this many tokens a call is latency-bound: sweep small tiles spread over many programs
# (head_split) instead of the large tiles that stream well.
FEW_TOKENS = 16384


def triton_sweep_space(spec: RopeSpec, tokens: int):
    """The Triton configs swept at ``tokens``: the part of the space that can win there."""
    if tokens >= FEW_TOKENS:
        axes = ((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32), (1,), (4, 8))
    else:
        axes = ((1, 2, 4), (1, 2, 4, 8), (1, 2, 4, 8, 16, 32, 64, 128), (1, 2, 4))
    for block_t, block_h, head_split, warps in itertools.product(*axes):
        config = {
            "block_t": block_t,
            "block_h": block_h,
            "head_split": head_split,
            "num_warps": warps,
            "num_stages": 1,
        }
        if not get_provider("triton").config_problems(spec, config):
            yield config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0", help="e.g. cuda:0")
    parser.add_argument(
        "--specs",
        default=",".join(DEFAULT_SPECS),
        help="model presets (NAME or NAME:tpN, see python -m autotune --list-models) or spec "
        "keys, e.g. llama-3-70b:tp8,q64_kv8_d128_r128_neox_bfloat16",
    )
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="e.g. 1,4096")
    parser.add_argument(
        "--points",
        default=None,
        help="spec@tokens pairs measured instead of every spec at every token count, e.g. "
        "llama-3-8b@256,q64_kv8_d128_r128_neox_bfloat16@64",
    )
    parser.add_argument("--dtypes", default="bfloat16", help="e.g. bfloat16,float16")
    parser.add_argument("--providers", default="triton,vllm,flashinfer")
    parser.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sweep Triton configs at every token count (and the copy ceiling at >= 16384)",
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed rounds per measurement, e.g. 10"
    )
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    versions = library_versions()
    print(
        f"device {torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e12:.2f} "
        f"TB/s; versions {versions}",
        flush=True,
    )
    available = {s.name for s in list_providers(device) if s.available}
    rows = []
    if args.points:
        pairs = [point.rsplit("@", 1) for point in args.points.split(",")]
        if any(len(pair) != 2 or not pair[1].isdigit() for pair in pairs):
            parser.error(f"--points: expected spec@tokens pairs, got {args.points!r}")
        points = [
            (name, dtype, int(tokens)) for name, tokens in pairs for dtype in args.dtypes.split(",")
        ]
    else:
        points = itertools.product(
            args.specs.split(","), args.dtypes.split(","), map(int, args.tokens.split(","))
        )
    for spec_name, dtype_name, tokens in points:
        spec = resolve_spec(spec_name, getattr(torch, dtype_name))
        floor_us = spec.bytes_moved(tokens) / bandwidth * 1e6
        candidates = []
        for name in args.providers.split(","):
            if name in available and get_provider(name).supports(spec):
                # The token-aware default: what select_rope runs where no table has an entry.
                candidates.append(
                    (name, "default", get_provider(name).default_config(spec, tokens))
                )
        if args.sweep:
            configs = list(triton_sweep_space(spec, tokens))
            candidates += [("triton", str(c), c) for c in configs]
            if spec.rotary_dim < spec.head_size and tokens >= FEW_TOKENS:
                candidates += [
                    ("slice_copy", f"bt{bt}_bh{bh}_w{w}", (bt, bh, w))
                    for bt, bh, w in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8, 16), (4, 8))
                    if slice_copy_geometry(spec, bt, bh).elems_per_thread(w) <= 64
                ]
        best: dict[str, tuple[float, str]] = {}
        for name, label, config in candidates:
            try:
                if name == "slice_copy":
                    fn = slice_copy_fn(spec, *config)
                else:
                    fn = get_provider(name).callable_for(spec, config)
                    check_correct(fn, spec, min(tokens, 4099), device)
                timing = time_rope(fn, spec, tokens, device, mode="graph", repeats=args.repeats)
            except Exception as exc:  # a failing candidate is reported, never fatal
                print(
                    f"  {spec_name} {tokens} {name} {label}: FAILED {type(exc).__name__}: "
                    f"{str(exc)[:200]}",
                    flush=True,
                )
                continue
            key = "triton_best" if name == "triton" and label != "default" else name
            if label == "default" and config:
                label = str(config)
            if key not in best or timing.median_us < best[key][0]:
                best[key] = (timing.median_us, label)
            rows.append(
                {
                    "device": torch.cuda.get_device_name(device),
                    "spec": spec_name,
                    "spec_key": spec.key,
                    "tokens": tokens,
                    "provider": name,
                    "config": label,
                    "p20_us": timing.p20_us,
                    "median_us": timing.median_us,
                    "p80_us": timing.p80_us,
                    "tbps": spec.bytes_moved(tokens) / timing.median_us / 1e6,
                    "pct_floor": 100 * floor_us / timing.median_us,
                    "floor_us": floor_us,
                    "torch": versions["torch"],
                    "triton": versions["triton"],
                    "flashinfer": versions["flashinfer"],
                    "vllm": versions["vllm"],
                }
            )
        summary = "  ".join(
            f"{k}={v[0]:.2f}us({100 * floor_us / v[0]:.0f}%)" for k, v in sorted(best.items())
        )
        print(
            f"{spec_name:15s} {dtype_name:8s} T={tokens:6d} floor={floor_us:8.2f}us  {summary}",
            flush=True,
        )
        for k in ("triton_best", "slice_copy"):
            if k in best:
                print(f"    {k}: {best[k][1]}", flush=True)
        if args.out and rows:  # after every point, so an interrupted run keeps its results
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
