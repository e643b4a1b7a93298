"""Host time per call of the ``vllm`` provider's callable against the op it wraps, without a GPU.

vLLM's compiled op is stood in for by a no-op CPU op of the same schema
(``rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size,
Tensor cos_sin_cache, bool is_neox) -> ()``), so what is timed is the host path alone: the
provider's per-call Python, the dispatcher, and no kernel. Three callables on vLLM's own layout
(``[T]`` int64 positions, q and k column slices of a fused qkv, 32/8 heads of 128, bf16):

- ``views, packet``: the provider as it was, less its layout checks (q and k as ``[T, H, D]``
  ``as_strided`` views, the op packet);
- ``provider``: the provider now (``kernels.providers._vllm``);
- ``op overload``: the overload called directly, the floor.

    python benchmarks/experiments/vllm_provider_host.py
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import RopeSpec, get_provider

SCHEMA = (
    "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
    "Tensor cos_sin_cache, bool is_neox) -> ()"
)


def views_and_packet(op, head_size: int, is_neox: bool):
    """The provider's callable before it handed vLLM's layout straight to the overload, less the
    layout checks that chose the views' strides (so its cost is a lower bound)."""

    def run(positions, query, key, cos_sin_cache):
        n = positions.numel()
        q = query.as_strided((n, query.shape[-1] // head_size, head_size),
                             (query.stride(0), head_size, 1))  # fmt: skip
        k = (
            None
            if key is None
            else key.as_strided(
                (n, key.shape[-1] // head_size, head_size), (key.stride(0), head_size, 1)
            )
        )
        if positions.dim() != 1:
            positions = positions.view(-1)
        if positions.dtype != torch.int64:
            positions = positions.long()
        op(positions, q, k, head_size, cos_sin_cache, is_neox)

    return run


def main() -> None:
    # Where vLLM registers its op, so that the provider finds the stand-in as it finds vLLM's.
    library = torch.library.Library("_C", "FRAGMENT")
    library.define(SCHEMA)
    library.impl("rotary_embedding", lambda *args: None, "CPU")
    packet = torch.ops._C.rotary_embedding
    spec = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
    qkv = torch.randn(4, (32 + 2 * 8) * 128, dtype=torch.bfloat16)
    args = (torch.arange(4), qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128],
            torch.randn(64, 128, dtype=torch.bfloat16))  # fmt: skip
    fns = {
        "views, packet": views_and_packet(packet, 128, True),
        "provider": get_provider("vllm").build(spec, {}),
        "op overload": lambda p, q, k, c: packet.default(p, q, k, 128, c, True),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(*args)
    for _ in range(7):  # rounds alternate between the callables, so drift reaches all alike
        for name, fn in fns.items():
            seconds = timeit.timeit(lambda fn=fn: fn(*args), number=20000)
            times[name].append(seconds / 20000 * 1e6)
    print(f"torch {torch.__version__}, host time per call, median of 7 rounds x 20000 calls")
    for name, values in times.items():
        print(f"{name:>14}: {statistics.median(values):.2f} us")


if __name__ == "__main__":
    main()
