"""``select_rope`` on real model shapes that no table or test of ours names, at token counts off
the bucket grid, against FlashInfer and vLLM, side by side in one run.

Every call is checked against the float64 reference first, then timed by CUDA-graph replay over
rotating inputs larger than the L2 (``kernels.measure.time_rope``); q and k are column views of
a fused qkv tensor, as a serving stack hands them over. Columns: ``select_rope`` with the
shipped table only (what a user gets out of the box), the performance model's own pick bound
directly (``configs/<device>.model.json``; ``-`` without one), FlashInfer, vLLM, and the speedup
of ``select_rope`` over the faster of the two.

    python benchmarks/unseen_shapes.py --device cuda:0            # H200: writes $OUT/... too
    TRITON_INTERPRET=1 python benchmarks/unseen_shapes.py --cpu-smoke   # tiny, on the CPU

The smoke run uses the H200 model file (``--model``) to exercise the model's pick on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import RopeSpec, get_provider, select_rope
from kernels.measure import check_correct, time_rope
from kernels.perf_model import PerfModel, model_file_name
from kernels.table import shipped_config_dir


@dataclass(frozen=True)
class Case:
    model: str  # the public config the shape comes from (heads / tensor parallel as noted)
    spec: RopeSpec
    tokens: int
    with_key: bool = True


def _spec(d, r, hq, hk, neox, dtype):
    return RopeSpec(d, r, hq, hk, neox, dtype)


BF16, FP16 = torch.bfloat16, torch.float16
# Public configs (config.json on the Hugging Face hub): head_dim, rotary dim
# (partial_rotary_factor / rotary_pct / rotary_dim), attention heads, key-value heads, style.
SHAPES = [
    ("Qwen2.5-14B", _spec(128, 128, 40, 8, True, BF16)),
    ("Qwen2.5-0.5B", _spec(64, 64, 14, 2, True, BF16)),
    ("Gemma-2-2B", _spec(256, 256, 8, 4, True, BF16)),
    ("Phi-3-mini", _spec(96, 96, 32, 32, True, BF16)),
    ("ChatGLM3-6B (rotary half, interleaved)", _spec(128, 64, 32, 2, False, FP16)),
    ("StableLM-2-1.6B (rotary 0.25)", _spec(64, 16, 32, 32, True, FP16)),
    ("Falcon-7B (71 q heads, MQA)", _spec(64, 64, 71, 1, True, BF16)),
    ("Llama-3.2-1B", _spec(64, 64, 32, 8, True, BF16)),
    ("GPT-NeoX-20B (rotary 0.25)", _spec(96, 24, 64, 64, True, FP16)),
    ("Qwen2.5-32B TP2", _spec(128, 128, 20, 4, True, BF16)),
    ("Persimmon-8B (rotary 0.5)", _spec(64, 32, 64, 64, True, FP16)),
    ("Gemma-7B", _spec(256, 256, 16, 16, True, BF16)),
]
TOKENS = (3, 47, 129, 700, 2047, 5000, 12000, 40000)


def cases() -> list[Case]:
    out = []
    for i, (name, spec) in enumerate(SHAPES):
        # Three off-grid counts per shape, spread over the range (rotating through TOKENS).
        for j in range(3):
            out.append(Case(name, spec, TOKENS[(i + 3 * j) % len(TOKENS)]))
    # A key-less call (a cross-attention or key-cached layer rotates only q).
    out.append(Case("Qwen2.5-14B, no key", SHAPES[0][1], 700, with_key=False))
    out.append(Case("Llama-3.2-1B, no key", SHAPES[7][1], 33, with_key=False))
    return out


def smoke_cases() -> list[Case]:
    tiny = RopeSpec(32, 16, 4, 2, False, torch.float32)
    return [Case("tiny GPT-J partial", tiny, 5), Case("tiny, no key", tiny, 3, with_key=False)]


def geomean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def selector_for(spec: RopeSpec, device: str, table_dir: str | None = None):
    """``select_rope`` for ``spec`` as a user gets it, without the fallback warning these
    unseen shapes expect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_rope(
            spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
            spec.dtype, device, table_dir=table_dir,
        )  # fmt: skip


def _available(name: str, device: str, spec: RopeSpec, with_key: bool) -> bool:
    provider = get_provider(name)
    return (
        provider.unavailable_reason(device) is None
        and provider.unsupported_reason(spec, has_key=with_key) is None
    )


def _measure(fn, case: Case, device: str, timing: dict) -> float | None:
    check_correct(fn, case.spec, case.tokens, device, keyless=not case.with_key, seed=1)
    return time_rope(fn, case.spec, case.tokens, device, with_key=case.with_key, **timing).median_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--table-dir", default=str(shipped_config_dir()))
    parser.add_argument("--model", help="model file (default: the device's, beside the table)")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, todo, timing = "cpu", smoke_cases(), {"repeats": 3, "min_round_s": 0.0}
    else:
        device, todo, timing = args.device, cases(), {"repeats": args.repeats}
    device_name = (
        torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    )
    smoke_model = Path(args.table_dir) / model_file_name("NVIDIA H200")
    default_model = smoke_model if args.cpu_smoke else None
    model_path = Path(
        args.model or default_model or Path(args.table_dir) / model_file_name(device_name)
    )
    model = PerfModel.load(model_path) if model_path.exists() else None

    rows = []
    for case in todo:
        s = case.spec
        rope = selector_for(s, device, args.table_dir)
        ours = _measure(rope, case, device, timing)
        choice = rope.explain(case.tokens, has_key=case.with_key)
        picked = "-"
        if model is not None:
            names = [n for n in model.providers if _available(n, device, s, case.with_key)]
            pick = model.best(s, case.tokens, names)
            if pick is not None:
                fn = get_provider(pick.provider).callable_for(s, pick.config)
                picked = _measure(fn, case, device, timing)
        vendor = {}
        for name in ("flashinfer", "vllm"):
            if _available(name, device, s, case.with_key):
                fn = get_provider(name).callable_for(s, None)
                vendor[name] = _measure(fn, case, device, timing)
        faster = min(vendor.values(), default=None)
        rows.append(
            {
                "model": case.model,
                "spec": s.key,
                "key": case.with_key,
                "tokens": case.tokens,
                "ours_us": ours,
                "ours_choice": f"{choice.provider} {dict(choice.config)}",
                "model_pick_us": picked,
                "flashinfer_us": vendor.get("flashinfer", "-"),
                "vllm_us": vendor.get("vllm", "-"),
                "speedup": (faster / ours) if faster else "-",
            }
        )

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [
        f"device {device_name}; select_rope with {args.table_dir} (table + model as the selector "
        f"reads them); model pick from {model_path if model else '-'}; "
        + ("CUDA-graph replay" if device.startswith("cuda") else "wall-clock")
        + " medians over rotating inputs (us)",
        "| model | spec | key | tokens | select_rope | model pick | flashinfer | vllm | "
        "speedup over faster |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if isinstance(r["speedup"], float) else "-"
        lines.append(
            f"| {r['model']} | {r['spec']} | {'yes' if r['key'] else 'no'} | {r['tokens']} | "
            f"{fmt(r['ours_us'])} | {fmt(r['model_pick_us'])} | {fmt(r['flashinfer_us'])} | "
            f"{fmt(r['vllm_us'])} | {speed} |"
        )
    speedups = [r["speedup"] for r in rows if isinstance(r["speedup"], float)]
    if speedups:
        geo = geomean(speedups)
        lines.append(
            f"\nselect_rope over the faster of FlashInfer and vLLM: geomean {geo:.3f}x, worst "
            f"{min(speedups):.3f}x, {sum(v < 0.97 for v in speedups)} of {len(speedups)} below "
            "0.97x"
        )
    picks = [
        (r["flashinfer_us"], r["vllm_us"], r["model_pick_us"])
        for r in rows
        if isinstance(r["model_pick_us"], float)
    ]
    model_speedups = [
        min(v for v in (f, vl) if isinstance(v, float)) / p
        for f, vl, p in picks
        if isinstance(f, float) or isinstance(vl, float)
    ]
    if model_speedups:
        geo = geomean(model_speedups)
        lines.append(
            f"the model's pick over the faster of the two: geomean {geo:.3f}x, worst "
            f"{min(model_speedups):.3f}x"
        )
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        tag = "cpu_smoke" if args.cpu_smoke else "h200"
        Path(out, f"unseen_shapes_{tag}.txt").write_text(text + "\n")
        write_csv(Path(out, f"unseen_shapes_{tag}.csv"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
