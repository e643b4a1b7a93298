"""What the compiled vLLM override hands the selector: for each call of the op under
torch.compile (and the same call eagerly), the tensors' shapes, strides, storage and the
position range against the cache rows; synchronizes after each call so a fault names it.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/experiments/compiled_layer_args.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import vllm_layer as vl  # noqa: E402

from kernels import RopeSpec  # noqa: E402
from kernels.integrations import vllm as plugin  # noqa: E402
from kernels.measure import make_inputs  # noqa: E402


def describe(name: str, t: torch.Tensor | None) -> str:
    if t is None:
        return f"{name}=None"
    storage = t.untyped_storage().nbytes()
    end = (
        t.storage_offset()
        + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
        + 1
    )
    return (
        f"{name}: {tuple(t.shape)} {t.dtype} stride={t.stride()} offset={t.storage_offset()} "
        f"last byte={end * t.element_size()} of storage {storage} ptr%16={t.data_ptr() % 16}"
    )


original = plugin.rotary_embedding


def traced(positions, query, key, head_size, cos_sin_cache, is_neox):
    print("  op call:", flush=True)
    for name, t in (("positions", positions), ("query", query), ("key", key)):
        print("   ", describe(name, t), flush=True)
    print("   ", describe("cache", cos_sin_cache), flush=True)
    print(
        f"    positions in [{int(positions.min())}, {int(positions.max())}], cache rows "
        f"{cos_sin_cache.shape[0]}",
        flush=True,
    )
    original(positions, query, key, head_size, cos_sin_cache, is_neox)
    torch.cuda.synchronize()
    print("    ok", flush=True)


plugin.rotary_embedding = traced
device = torch.device("cuda:0")
layer = vl.build_layer("llama3-8b", torch.bfloat16, device, overridden=True)
spec = RopeSpec(layer.head_size, layer.rotary_dim, 32, 8, layer.is_neox_style, torch.bfloat16)


def run(p, q, k, c):
    layer.forward_cuda(p, q, k)


compiled = torch.compile(run, fullgraph=True)
for tokens in (256, 4096):
    x = make_inputs(spec, tokens, device)
    print(f"eager {tokens}:", flush=True)
    run(*x.args)
    print(f"compiled {tokens}:", flush=True)
    compiled(*x.args)
    torch.cuda.synchronize()
    print(f"compiled {tokens}: done", flush=True)
