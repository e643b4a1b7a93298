"""One Triton config timed at token counts on and off the tuning grid (powers of two).

The tuner measures only power-of-two token counts, so a config chosen there is never timed at,
say, 5000 tokens. This times a spec's configs at counts around a grid point, gated against the
float64 reference and by CUDA-graph replay, to show whether a config's time follows the token
count smoothly off the grid.

    python benchmarks/experiments/offgrid_tokens.py --device cuda:0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import RopeSpec, get_provider
from kernels.measure import check_correct, time_rope

# StableLM-2-1.6B (rotary 16 of 64, fp16): the H100 table's bucket-4096 pick lost 0.64x at 5000.
SPEC = RopeSpec(64, 16, 32, 32, True, torch.float16)
CONFIGS = [
    {"block_t": 32, "block_h": 16, "head_split": 4, "num_warps": 8, "num_stages": 1},
    {"block_t": 1, "block_h": 32, "head_split": 1, "num_warps": 4, "num_stages": 3},
    {"block_t": 4, "block_h": 32, "head_split": 1, "num_warps": 4, "num_stages": 3},
]
TOKENS = [4096, 4992, 5000, 5008, 5120, 6144, 8192]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name(args.device)}; spec {SPEC.key}; "
          "CUDA-graph replay medians (us)")  # fmt: skip
    fns = [("vllm", get_provider("vllm").callable_for(SPEC, None))]
    fns += [(str(c), get_provider("triton").callable_for(SPEC, c)) for c in CONFIGS]
    print("| provider | " + " | ".join(str(t) for t in TOKENS) + " |")
    print("|---" * (len(TOKENS) + 1) + "|")
    for name, fn in fns:
        times = []
        for tokens in TOKENS:
            check_correct(fn, SPEC, tokens, args.device, seed=1)
            times.append(time_rope(fn, SPEC, tokens, args.device, repeats=20).median_us)
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
