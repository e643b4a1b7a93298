"""Which part of the compiled vLLM-override path makes an illegal memory access on the GPU:
each variant runs in its own process (a CUDA fault ends the process), over the token counts
the layer benchmark uses, and prints ok or the error.

    python benchmarks/experiments/compiled_layer_crash.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

VARIANT = r"""
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/benchmarks")
import vllm_layer as vl
from kernels.measure import time_rope, make_inputs
import dataclasses
from kernels import RopeSpec, get_provider, register_provider
mode, fast, tokens_list, compiled, fused = {mode!r}, {fast!r}, {tokens!r}, {compiled!r}, {fused!r}
if not fast:  # Triton's public launch everywhere
    register_provider(dataclasses.replace(get_provider("triton"), fast_launch=False))
device = torch.device("cuda:0")
ours = vl.build_layer("llama3-8b", torch.bfloat16, device, overridden=True)
spec = RopeSpec(ours.head_size, ours.rotary_dim, 32, 8, ours.is_neox_style, torch.bfloat16)
def run_ours(p, q, k, c, layer=ours):
    layer.forward_cuda(p, q, k)
fn = torch.compile(run_ours, fullgraph=True) if compiled else run_ours
if fused:  # compiled over the fused qkv tensor, split inside the graph (as vLLM's models do)
    inner = torch.compile(
        lambda p, qkv: ours.forward_cuda(p, qkv[:, :4096], qkv[:, 4096:5120]), fullgraph=True
    )
    fn = lambda p, q, k, c: inner(p, q._base)
for tokens in tokens_list:
    if mode == "call":
        x = make_inputs(spec, tokens, device)
        for _ in range(3):
            fn(*x.args)
        torch.cuda.synchronize()
    else:
        time_rope(fn, spec, tokens, device, mode=mode, repeats=3)
    print("  ok", tokens, flush=True)
"""


def main() -> int:
    variants = [  # name, timing, fast launch, token counts, compiled, over the fused qkv
        ("compiled, q and k as inputs, graph timing", "graph", True, (1, 16, 256, 4096), True, 0),
        ("compiled, q and k as inputs, plain calls", "call", True, (1, 16, 256, 4096), True, 0),
        ("compiled over fused qkv, plain calls", "call", True, (1, 16, 256, 4096, 16384), 1, 1),
        ("compiled over fused qkv, graph timing", "graph", True, (1, 16, 256, 4096, 16384), 1, 1),
        ("eager layer, graph timing", "graph", True, (1, 16, 256, 4096), False, 0),
    ]
    for name, mode, fast, tokens, compiled, fused in variants:
        code = VARIANT.format(
            root=str(ROOT), mode=mode, fast=fast, tokens=tokens, compiled=compiled, fused=fused
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=240
        )
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-2:]
        print(f"{name}: exit {proc.returncode}\n{proc.stdout.rstrip()}")
        for line in errors:
            print("  ", line[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
