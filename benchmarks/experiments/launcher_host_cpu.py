"""Host time of the Triton launchers' fast path on this CPU, at a git revision and in the working
tree: what a change to the launcher's Python costs per call, measured without a GPU.

Each launcher (RoPE on a Llama-3-8B slice of a fused qkv, mRoPE on Qwen2.5-VL-7B's heads with
``[3, T]`` positions; and the RoPE one behind a CPU selector, its checks and dispatch, 4 tokens)
gets a stand-in kernel: its public launch returns a compiled kernel whose
``run`` does nothing, so a timed call is the launcher's own host work (argument parse, cache
key, lookup, the ``run`` call) and nothing of Triton's. The current stream's lookup returns 0
(no CUDA here). Each side runs in its own process (``git worktree`` for the revision), the two
alternating ``--rounds`` times; each process reports the median over 15 batches of 20000 calls.

    python benchmarks/experiments/launcher_host_cpu.py --rev HEAD

Prints per case each side's fastest and median process, in ns per call (the fastest: the
least disturbed on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
CALLS, BATCHES = 20000, 15


def _measure(root: str) -> dict[str, float]:
    """ns per fast-path call of each launcher, with ``root``'s ``kernels`` package."""
    sys.path.insert(0, root)
    import torch

    from kernels import RopeSelector, RopeSpec
    from kernels.providers import MropeLauncher, TritonLauncher, default_triton_config

    assert Path(sys.modules["kernels"].__file__).is_relative_to(root)

    class Compiled:
        function = packed_metadata = None

        def run(self, *args):
            pass

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled()

    torch._C._cuda_getCurrentRawStream = lambda index: 0  # no CUDA here: the stream is 0

    def cases():
        spec = RopeSpec(head_size=128, rotary_dim=128, num_heads=32, num_kv_heads=8,
                        is_neox=True, dtype=torch.bfloat16)  # fmt: skip
        qkv = torch.randn(4, (32 + 2 * 8) * 128, dtype=torch.bfloat16)
        q, k = qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128]
        cache = torch.randn(4096, 128)
        positions = torch.arange(4)
        launcher = TritonLauncher(spec, default_triton_config(spec, 4), kernel=StandIn(), fast=True)
        yield "rope", launcher, (positions, q, k, cache)
        route = SimpleNamespace(provider="triton", config={}, fn=launcher, why="stand-in")
        selector = RopeSelector(spec, torch.device("cpu"), "graph", (4,), (route,), (route,),
                                None, None)  # fmt: skip
        yield "select", selector, (positions, q, k, cache)
        spec = RopeSpec(head_size=128, rotary_dim=128, num_heads=28, num_kv_heads=4,
                        is_neox=True, dtype=torch.bfloat16, mrope_section=(16, 24, 24))  # fmt: skip
        qkv = torch.randn(4, (28 + 2 * 4) * 128, dtype=torch.bfloat16)
        q, k = qkv[:, : 28 * 128], qkv[:, 28 * 128 : 32 * 128]
        positions = torch.randint(0, 4096, (3, 4))
        launcher = MropeLauncher(spec, default_triton_config(spec, 4), kernel=StandIn(), fast=True)
        yield "mrope", launcher, (positions, q, k, cache)

    result = {}
    for name, fn, args in cases():
        fn(*args)  # the public launch: fills the fast path's cache
        per_call = []
        for _ in range(BATCHES):
            start = time.perf_counter_ns()
            for _ in range(CALLS):
                fn(*args)
            per_call.append((time.perf_counter_ns() - start) / CALLS)
        result[name] = statistics.median(per_call)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=7, help="processes per side, alternating")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # a measuring child process
    args = parser.parse_args()
    if args.root:
        print(json.dumps(_measure(args.root)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        old = str(Path(tmp) / "rev")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", old,
                        args.rev], check=True)  # fmt: skip
        try:
            sides: dict[str, list[dict[str, float]]] = {args.rev: [], "working tree": []}
            for _ in range(args.rounds):
                for side, root in ((args.rev, old), ("working tree", str(ROOT))):
                    out = subprocess.run([sys.executable, __file__, "--root", root],
                                         check=True, capture_output=True, text=True)  # fmt: skip
                    sides[side].append(json.loads(out.stdout))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", old],
                           check=True)  # fmt: skip
    print(f"ns per call, per side the fastest and the median of {args.rounds} processes (each the "
          f"median of {BATCHES} x {CALLS} calls); this CPU, stand-in kernel")  # fmt: skip
    for name in sides[args.rev][0]:
        cells, ratio = [], []
        for side, runs in sides.items():
            values = sorted(r[name] for r in runs)
            cells.append(f"{side}: {values[0]:.0f} / {statistics.median(values):.0f}")
            ratio.append(values[0])
        print(f"{name:6s} " + "  ".join(cells) + f"  (fastest, working tree / {args.rev}: "
              f"{ratio[1] / ratio[0]:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
