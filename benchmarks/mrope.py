"""Multimodal RoPE (mRoPE): our kernel against vLLM's ``MRotaryEmbedding`` on one GPU.

For each model (its language model's heads at tensor parallel 1, head 128) and token count, on
the same inputs (q and k column slices of a fused qkv tensor, ``[3, T]`` positions sliced from a
longer buffer, the layer's cos/sin cache in the query's dtype, as vLLM holds it):

- ``vllm``: vLLM 0.26's ``MRotaryEmbedding.forward_cuda`` (the cache gathered into a
  ``[3, T, rotary_dim]`` tensor, then its Triton kernel; it returns new q and k);
- ``inductor``: ``torch.compile`` (Inductor, ``fullgraph=True``, dynamic) of its
  ``forward_native``, what vLLM runs under its default compile with custom ops off;
- ``triton_mrope``: our kernel at its default config (in place);
- ``select_rope``: what ``select_rope(..., mrope_section=...)`` runs here (the device's table
  entry, else the same default).

Each is first checked against the float64 reference on the layer's cache (FAIL otherwise), then
timed by CUDA graph replay over input sets covering 3x the L2 (``kernels.measure.time_rope``,
median over rounds). The memory floor is the bytes the call must move
(:meth:`kernels.RopeSpec.bytes_moved`: rotated q/k slices read and written, ``rotary_dim`` cache
values and three positions per token) over the copy bandwidth measured in the same run.

Writes ``mrope.csv`` and ``mrope.txt`` to ``$OUT`` (or ``--out``) and prints the table with the
geomean speedups over vLLM and Inductor per model.

    PYTHONPATH=$PWD:/tmp/site python benchmarks/mrope.py --device cuda:0
    python benchmarks/mrope.py --models qwen3-vl-8b --tokens 1,4096 --repeats 10
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

from autotune.models import get_preset
from kernels import RopeSpec, get_provider, select_rope
from kernels.measure import MAX_POSITION, copy_bandwidth, make_inputs, time_rope
from kernels.providers import TRITON_MROPE
from kernels.table import library_versions
from kernels.testing import assert_rope_close, rope_reference

DEFAULT_MODELS = ("qwen2.5-vl-7b", "qwen3-vl-8b", "qwen2-vl-2b")
IMPLEMENTATIONS = ("vllm", "inductor", TRITON_MROPE, "select_rope")
FIELDS = [
    "device",
    "vllm",
    "model",
    "spec",
    "tokens",
    "impl",
    "choice",
    "correct",
    "p20_us",
    "median_us",
    "p80_us",
    "floor_us",
    "pct_floor",
    "speedup_vs_vllm",
    "speedup_vs_inductor",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma list of autotune presets"
    )
    parser.add_argument("--tokens", default="1,16,256,4096,16384", help="comma list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per measurement")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    return parser.parse_args(argv)


def build_layer(spec: RopeSpec, device: torch.device):
    """vLLM's ``MRotaryEmbedding`` for ``spec``, its cache ``MAX_POSITION`` rows long."""
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding as rope_module

    try:
        device_config = DeviceConfig(device="cuda")
    except Exception:  # vLLM finds no CUDA platform when only its Python layers are installed
        device_config = DeviceConfig(device="cpu")
    config = VllmConfig(
        device_config=device_config, compilation_config=CompilationConfig(custom_ops=["all"])
    )
    parameters = {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": list(spec.mrope_section),
        "mrope_interleaved": spec.mrope_interleaved,
    }
    rope_module._ROPE_DICT.clear()
    with set_current_vllm_config(config):
        # The layer keeps 4x max_position rows (video positions run past the text length).
        layer = rope_module.get_rope(
            spec.head_size, MAX_POSITION // 4, spec.is_neox, parameters, spec.dtype
        )
    rope_module._ROPE_DICT.clear()
    if type(layer).__name__ != "MRotaryEmbedding":
        raise RuntimeError(f"get_rope built {type(layer).__name__}, not MRotaryEmbedding")
    layer = layer.to(device)
    layer.cos_sin_cache = layer.cos_sin_cache.to(spec.dtype)  # as its first call converts it
    return layer


def implementations(spec: RopeSpec, layer, device: torch.device) -> dict:
    """``name -> (fn(positions, query, key, cache) -> (q, k) or None, what runs)``; every one
    uses the layer's cache, whatever cache the timing passes."""
    cache = layer.cos_sin_cache
    q_width = spec.num_heads * spec.head_size
    k_width = spec.num_kv_heads * spec.head_size
    torch._dynamo.reset()

    def split(p, qkv):
        return layer.forward_native(p, qkv[:, :q_width], qkv[:, q_width : q_width + k_width])

    # Over the fused qkv tensor, split inside the graph as vLLM's models are compiled.
    native = torch.compile(split, fullgraph=True, dynamic=True)
    ours = get_provider(TRITON_MROPE).callable_for(spec)
    selector = select_rope(
        spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
        spec.dtype, device, mrope_section=spec.mrope_section,
        mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip

    def in_place(fn):
        def run(p, q, k, c):
            fn(p, q, k, cache)
            return q, k

        return run

    return {
        "vllm": (lambda p, q, k, c: layer.forward_cuda(p, q, k), "forward_cuda"),
        "inductor": (lambda p, q, k, c: native(p, q._base), "compiled forward_native"),
        TRITON_MROPE: (in_place(ours), "default config"),
        "select_rope": (in_place(selector), selector),
    }


def check(fn, spec: RopeSpec, cache: torch.Tensor, tokens: int, device) -> bool:
    """``fn``'s output against the float64 reference on ``cache`` (fresh inputs)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tokens)
    inputs = make_inputs(spec, tokens, device, generator=gen)
    query, key = inputs.query, inputs.key
    expected = rope_reference(
        inputs.positions, query, key, cache, spec.head_size, spec.is_neox,
        mrope_section=spec.mrope_section, mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip
    before = inputs.qkv.clone()
    got_q, got_k = fn(inputs.positions, query, key, cache)
    torch.cuda.synchronize(device)
    try:
        assert_rope_close(got_q, expected[0], spec.dtype, "query")
        assert_rope_close(got_k, expected[1], spec.dtype, "key")
    except AssertionError as exc:
        print(f"FAIL {spec.key} {tokens} tokens: {exc}", file=sys.stderr)
        return False
    v_start = (spec.num_heads + spec.num_kv_heads) * spec.head_size
    return torch.equal(before[:, v_start:], inputs.qkv[:, v_start:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # vLLM's op library (the vllm provider's loader), as a vLLM process has it loaded.
    reason = get_provider("vllm").unavailable_reason(device)
    if reason is not None:
        print(f"vLLM's CUDA op is unavailable: {reason}", file=sys.stderr)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    device_name = torch.cuda.get_device_name(device)
    vllm_version = library_versions().get("vllm")
    bandwidth = copy_bandwidth(device)
    rows, failed = [], False
    for name in args.models.split(","):
        spec = get_preset(name).specs((dtype,), (1,))[0]
        if not spec.is_mrope:
            raise SystemExit(f"--models: {name} is not an mRoPE preset")
        layer = build_layer(spec, device)
        impls = implementations(spec, layer, device)
        # 101 tokens: odd, and past the largest token block (full and masked blocks both run).
        correct = {impl: check(fn, spec, layer.cos_sin_cache, 101, device)
                   for impl, (fn, _) in impls.items()}  # fmt: skip
        failed |= not all(correct.values())
        for tokens in tokens_list:
            start = time.perf_counter()
            floor_us = spec.bytes_moved(tokens, layer.cos_sin_cache.dtype) / bandwidth * 1e6
            times = {}
            for impl, (fn, what) in impls.items():
                timing = time_rope(fn, spec, tokens, device, repeats=args.repeats)
                times[impl] = timing.median_us
                choice = what.explain(tokens).provider if impl == "select_rope" else what
                rows.append({
                    "device": device_name, "vllm": vllm_version, "model": name,
                    "spec": spec.key, "tokens": tokens, "impl": impl, "choice": choice,
                    "correct": correct[impl], "p20_us": f"{timing.p20_us:.2f}",
                    "median_us": f"{timing.median_us:.2f}", "p80_us": f"{timing.p80_us:.2f}",
                    "floor_us": f"{floor_us:.2f}",
                    "pct_floor": f"{100 * floor_us / timing.median_us:.0f}",
                })  # fmt: skip
            for row in rows[-len(impls) :]:
                us = times[row["impl"]]
                row["speedup_vs_vllm"] = f"{times['vllm'] / us:.2f}"
                row["speedup_vs_inductor"] = f"{times['inductor'] / us:.2f}"
            print(
                f"{name} {tokens}: vllm {times['vllm']:.2f}, inductor {times['inductor']:.2f}, "
                f"ours {times[TRITON_MROPE]:.2f}, select_rope {times['select_rope']:.2f} us "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    write(rows, args.out, bandwidth)
    return 1 if failed else 0


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def write(rows: list[dict], out: str | None, bandwidth: float) -> None:
    lines = [
        "| model | tokens | impl | choice | correct | median us | floor us | % floor | "
        "x vLLM | x Inductor |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['impl']} | {r['choice']} | "
            f"{'yes' if r['correct'] else 'FAIL'} | {r['median_us']} | {r['floor_us']} | "
            f"{r['pct_floor']} | {r['speedup_vs_vllm']} | {r['speedup_vs_inductor']} |"
        )
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        for impl in (TRITON_MROPE, "select_rope"):
            mine = [r for r in rows if r["model"] == model and r["impl"] == impl]
            vs_vllm = [float(r["speedup_vs_vllm"]) for r in mine]
            vs_inductor = [float(r["speedup_vs_inductor"]) for r in mine]
            lines.append(
                f"{model} {impl}: geomean x{_geomean(vs_vllm):.2f} over vLLM (min "
                f"x{min(vs_vllm):.2f}), x{_geomean(vs_inductor):.2f} over Inductor (min "
                f"x{min(vs_inductor):.2f})"
            )
    head = f"{rows[0]['device']}, vLLM {rows[0]['vllm']}, " if rows else ""
    text = "\n".join([f"{head}copy bandwidth {bandwidth / 1e12:.2f} TB/s", "", *lines])
    print(text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "mrope.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        (folder / "mrope.txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
