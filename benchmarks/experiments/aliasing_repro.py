"""The compiled-aliasing fault, reduced: one in-place custom op ``rope(positions, q, k, cache)``
(mutating q and k) compiled with ``fullgraph=True``, q and k passed as two graph inputs that
are column views of one qkv tensor, called at growing token counts (the second count makes
Dynamo compile a dynamic graph). The op's body is swappable, so the fault can be pinned to the
body or to what the compiled graph does around any in-place op on aliasing inputs:

- ``ours``: ``select_rope``'s Triton kernel (the plugin's path);
- ``torch``: ``select_rope`` forced to the PyTorch provider (no Triton, no custom kernel);
- ``vllm``: vLLM's CUDA op ``torch.ops._C.rotary_embedding``;
- ``noop``: writes nothing (only the graph's own copies run).

Each body runs in its own process (a CUDA fault ends it); each call's result is checked against
the same op run eagerly on clones, and the argument layout the op received is printed once per
token count. ``--sanitize`` runs each body under ``compute-sanitizer`` (memcheck), which names
the kernel and address of an illegal access. ``--device cpu`` runs Inductor's CPU backend (the
graph-level handling of the aliasing inputs is the same; bodies ``noop`` and ``torch``).

    PYTHONPATH=$PWD:/tmp/site python benchmarks/experiments/aliasing_repro.py
    python benchmarks/experiments/aliasing_repro.py --device cpu --tokens 1,16,256
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch

HEADS, KV_HEADS, HEAD = 32, 8, 128  # Llama-3-8B
WIDTH = (HEADS + 2 * KV_HEADS) * HEAD
SEEN: dict[int, str] = {}


def _body(name: str, device: str):
    from kernels import get_provider, select_rope

    if name == "noop":
        return lambda p, q, k, c: None
    if name == "vllm":
        reason = get_provider("vllm").unavailable_reason(device)
        if reason is not None:
            raise SystemExit(f"vllm: {reason}")
        op = torch.ops._C.rotary_embedding
        return lambda p, q, k, c: op(p, q, k, HEAD, c, True)
    provider = None if name == "ours" else "torch"
    return select_rope(HEAD, HEAD, HEADS, KV_HEADS, True, torch.bfloat16, device, provider=provider)


def _layout(t: torch.Tensor) -> str:
    return (
        f"{tuple(t.shape)} stride={t.stride()} offset={t.storage_offset()} "
        f"storage={t.untyped_storage().nbytes()}B ptr={t.data_ptr():#x}"
    )


def run_body(name: str, tokens: list[int], device: str) -> None:
    body = _body(name, device)

    @torch.library.custom_op("aliasing_repro::rope", mutates_args=("query", "key"))
    def rope(
        positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cache: torch.Tensor
    ) -> None:
        n = positions.numel()
        if n not in SEEN:
            SEEN[n] = f"query {_layout(query)}; key {_layout(key)}"
            print(f"    op at {n}: {SEEN[n]}", flush=True)
        body(positions, query, key, cache)

    @rope.register_fake
    def _(positions, query, key, cache) -> None:
        return None

    def step(positions, query, key, cache):
        torch.ops.aliasing_repro.rope(positions, query, key, cache)

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator(device=device).manual_seed(0)
    angles = torch.rand(8192, HEAD // 2, device=device, generator=g) * 6.28
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    for n in tokens:
        for _ in range(3):
            qkv = torch.randn(n, WIDTH, device=device, generator=g).to(torch.bfloat16)
            positions = torch.randint(0, 8192, (n,), device=device, generator=g)
            q, k = qkv[:, : HEADS * HEAD], qkv[:, HEADS * HEAD : (HEADS + KV_HEADS) * HEAD]
            want_q, want_k = q.clone(), k.clone()
            body(positions, want_q, want_k, cache)
            compiled(positions, q, k, cache)
            if device != "cpu":
                torch.cuda.synchronize()
            same = torch.equal(q, want_q) and torch.equal(k, want_k)
            if not same:
                print(f"  WRONG at {n} tokens: compiled differs from eager", flush=True)
                break
        print(f"  ok {n}" if same else f"  wrong {n}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--bodies", help="default: noop,torch,vllm,ours (cpu: noop,torch)")
    parser.add_argument("--tokens", default="1,16,256,4096,16384")
    parser.add_argument("--sanitize", action="store_true", help="under compute-sanitizer")
    parser.add_argument("--body", help=argparse.SUPPRESS)  # a child process's own body
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.body:
        run_body(args.body, tokens, args.device)
        return 0
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (Inductor C++)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    bodies = args.bodies or ("noop,torch,vllm,ours" if args.device == "cuda" else "noop,torch")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    for body in bodies.split(","):
        command = [sys.executable, __file__, "--body", body, "--tokens", args.tokens]
        command += ["--device", args.device]
        if args.sanitize:
            command = [sanitizer, "--tool", "memcheck", "--print-limit", "5", *command]
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=400, env=dict(os.environ)
        )
        print(f"{body}: exit {proc.returncode}\n{proc.stdout.rstrip()}", flush=True)
        for line in [x for x in proc.stderr.splitlines() if "rror" in x or "=====" in x][-12:]:
            print("   ", line[:300], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
