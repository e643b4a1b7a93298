"""``select_rope`` on real model shapes that no table or test of ours names, at token counts off
the bucket grid, against FlashInfer and vLLM, side by side in one run.

Every call is checked against the float64 reference first, then timed by CUDA-graph replay over
rotating inputs larger than the L2 (``kernels.measure.time_rope``); q and k are column views of
a fused qkv tensor, as a serving stack hands them over. Columns: ``select_rope`` with the
shipped table only (what a user gets out of the box), the performance model's own pick bound
directly (the model that ``select_rope`` reads: ``configs/<device>.model.json``, else the one
transferred from the nearest device; ``-`` without one), FlashInfer, vLLM, and the speedup of
``select_rope`` over the faster of the two.

``--data`` times ``select_rope`` on other data too, each in its own column, against the same
vendor timings: ``own`` (the table directory as it is: this device's table and model, else the
nearest device's, see ``kernels.transfer``), ``transfer`` (this device's table and model hidden,
so the nearest device's stand in: a GPU nobody measured) and ``default`` (hidden, transfer off:
the untuned default).

    python benchmarks/unseen_shapes.py --device cuda:0            # writes $OUT/... too
    python benchmarks/unseen_shapes.py --device cuda:0 --data own,transfer,default
    TRITON_INTERPRET=1 python benchmarks/unseen_shapes.py --cpu-smoke   # tiny, on the CPU

The smoke run uses the H200 model file (``--model``) to exercise the model's pick on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import RopeSpec, get_provider, select_rope
from kernels.measure import check_correct, time_rope
from kernels.perf_model import PerfModel, find_model, model_file_name
from kernels.table import device_table_name, hardware_metadata, shipped_config_dir

# What select_rope reads in each --data variant: (hide this device's files, transfer).
DATA = {"own": (False, True), "transfer": (True, True), "default": (True, False)}


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


def selector_bucket(tokens: int) -> int:
    """The power-of-two bucket (1 to 65536) nearest ``tokens`` in log scale: the one whose
    route a selector without table entries runs for it."""
    return min((2**i for i in range(17)), key=lambda b: abs(math.log(b / tokens)))


def geomean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def selector_for(
    spec: RopeSpec, device: str, table_dir: str | None = None, transfer: bool | None = None
):
    """``select_rope`` for ``spec`` as a user gets it, without the fallback warning these
    unseen shapes expect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_rope(
            spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
            spec.dtype, device, table_dir=table_dir, transfer=transfer,
        )  # fmt: skip


def hide_own(table_dir: str | Path, device_name: str, into: Path) -> Path:
    """A copy of ``table_dir``'s files in ``into`` without ``device_name``'s table and model:
    what ``select_rope`` reads on a GPU nobody measured."""
    own = {device_table_name(device_name), model_file_name(device_name)}
    for path in sorted(Path(table_dir).glob("*.json")):
        if path.name not in own:
            shutil.copy2(path, into / path.name)
    return into


def model_for(
    source: tuple[str, bool], device: str, model_file: str | None = None
) -> PerfModel | None:
    """The model whose own pick is timed: ``model_file`` when given, else the one ``select_rope``
    reads on ``device`` from ``source`` (table directory, transfer allowed)."""
    if model_file is not None:
        return PerfModel.load(model_file)
    table_dir, transfer = source
    return find_model(table_dir, torch.device(device), transfer=transfer)


def short_tag(device_name: str) -> str:
    """``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``: result file names."""
    words = [w for w in device_name.split() if w.upper() != "NVIDIA"] or ["device"]
    return device_table_name(words[0]).removesuffix(".json").lower()


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
    parser.add_argument("--model", help="model file (default: the one select_rope reads)")
    parser.add_argument(
        "--data",
        default="own",
        help="comma list of what select_rope reads, a column each: own (the table directory), "
        "transfer (this device's table and model hidden), default (hidden, transfer off); "
        "e.g. --data own,transfer,default",
    )
    parser.add_argument("--tag", help="result file tag (default: from the device, e.g. h100)")
    args = parser.parse_args()
    variants = args.data.split(",")
    if not variants or any(v not in DATA for v in variants) or len(set(variants)) < len(variants):
        parser.error(f"--data: expected a comma list of {', '.join(DATA)}, got {args.data!r}")
    if args.cpu_smoke:
        device, todo, timing = "cpu", smoke_cases(), {"repeats": 3, "min_round_s": 0.0}
    else:
        device, todo, timing = args.device, cases(), {"repeats": args.repeats}
    device_name = hardware_metadata(device)["device_name"]
    hidden = Path(tempfile.mkdtemp(prefix="unseen-shapes-"))
    try:
        return run(args, variants, device, device_name, todo, timing, hidden)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def run(args, variants, device, device_name, todo, timing, hidden: Path) -> int:
    sources = {}  # variant -> (table_dir, transfer)
    for variant in variants:
        hide, transfer = DATA[variant]
        where = hide_own(args.table_dir, device_name, hidden) if hide else args.table_dir
        sources[variant] = (str(where), transfer)
    model_file = args.model
    if model_file is None and args.cpu_smoke:  # the CPU has no model: exercise the H200's
        h200 = Path(args.table_dir) / model_file_name("NVIDIA H200")
        model_file = str(h200) if h200.exists() else None
    model = model_for(sources[variants[0]], device, model_file)
    model_path = None if model is None else model.source

    def column(variant: str, field: str) -> str:
        own = {"us": "ours_us", "choice": "ours_choice", "speedup": "speedup"}
        return own[field] if variant == "own" else f"{variant}_{field}"

    rows = []
    for case in todo:
        s = case.spec
        row = {"model": case.model, "spec": s.key, "key": case.with_key, "tokens": case.tokens}
        for variant in variants:
            rope = selector_for(s, device, *sources[variant])
            row[column(variant, "us")] = _measure(rope, case, device, timing)
            choice = rope.explain(case.tokens, has_key=case.with_key)
            row[column(variant, "choice")] = f"{choice.provider} {dict(choice.config)}"
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
        row["model_pick_us"] = picked
        row["flashinfer_us"] = vendor.get("flashinfer", "-")
        row["vllm_us"] = vendor.get("vllm", "-")
        for variant in variants:
            ours = row[column(variant, "us")]
            row[column(variant, "speedup")] = (faster / ours) if faster else "-"
        rows.append(row)
        # One line per case as it lands: a run cut short by its time limit still shows them.
        fields = (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(" ".join(fields), file=sys.stderr, flush=True)

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    def speed(v):
        return f"{v:.2f}x" if isinstance(v, float) else "-"

    heads = ["select_rope" if v == "own" else f"select_rope ({v})" for v in variants]
    speed_heads = ["speedup over faster" + ("" if v == "own" else f" ({v})") for v in variants]
    data = "; ".join(f"{v}: {d}" + ("" if t else ", transfer off") for v, (d, t) in sources.items())
    lines = [
        f"device {device_name}; select_rope with {data} (table + model as the selector "
        f"reads them); model pick from {model_path or '-'}; "
        + ("CUDA-graph replay" if device.startswith("cuda") else "wall-clock")
        + " medians over rotating inputs (us)",
        "| model | spec | key | tokens | "
        + " | ".join(heads[:1])
        + " | model pick | "
        + "".join(f"{h} | " for h in heads[1:])
        + "flashinfer | vllm | "
        + " | ".join(speed_heads)
        + " |",
        "|---" * (7 + 2 * len(variants)) + "|",
    ]
    for r in rows:
        times = [fmt(r[column(v, "us")]) for v in variants]
        lines.append(
            f"| {r['model']} | {r['spec']} | {'yes' if r['key'] else 'no'} | {r['tokens']} | "
            f"{times[0]} | {fmt(r['model_pick_us'])} | "
            + "".join(f"{t} | " for t in times[1:])
            + f"{fmt(r['flashinfer_us'])} | {fmt(r['vllm_us'])} | "
            + " | ".join(speed(r[column(v, "speedup")]) for v in variants)
            + " |"
        )
    for variant, head in zip(variants, heads, strict=True):
        speedups = [r[column(variant, "speedup")] for r in rows]
        speedups = [v for v in speedups if isinstance(v, float)]
        if speedups:
            geo = geomean(speedups)
            lines.append(
                ("\n" if variant == variants[0] else "")
                + f"{head} over the faster of FlashInfer and vLLM: geomean {geo:.3f}x, worst "
                f"{min(speedups):.3f}x, {sum(v < 0.97 for v in speedups)} of {len(speedups)} "
                "below 0.97x"
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
        tag = args.tag or ("cpu_smoke" if args.cpu_smoke else short_tag(device_name))
        if variants != ["own"]:
            tag += "_" + "_".join(variants)
        Path(out, f"unseen_shapes_{tag}.txt").write_text(text + "\n")
        write_csv(Path(out, f"unseen_shapes_{tag}.csv"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
