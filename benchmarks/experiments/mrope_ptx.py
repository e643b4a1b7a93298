"""Whether a change to the Triton mRoPE kernel changed the code ``[3, T]`` calls run: the
kernel's PTX for sm_90 at a git revision and in the working tree, compiled here (no GPU needed;
Triton's CUDA backend brings its own ``ptxas``).

Both versions are read from their files (``git show REV:path`` for the revision) and compiled
with the same signature, constexprs and options for each case below; a kernel that still has
the ``STREAMS`` constexpr gets ``STREAMS=3``. Debug sections and line markers are left out of
the comparison (they name the source file). Prints, per case, whether the PTX is identical and
the line counts.

    python benchmarks/experiments/mrope_ptx.py --rev 98986ea
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("kernels/providers/_triton_kernel.py", "kernels/providers/_triton_mrope_kernel.py")
# Qwen2.5-VL-7B's heads (NeoX) and a GPT-J-style spec with partial rotary, each at configs of
# the three shapes the tuner picks: whole tokens, one head per program, head blocks split.
CASES = [
    dict(NUM_Q_HEADS=28, NUM_K_HEADS=4, ROT_HALF=64, HALF_PAD=64, IS_NEOX=True, cfg=cfg)
    for cfg in ((1, 32, 1, 8), (2, 1, 32, 4), (4, 2, 8, 2))
] + [dict(NUM_Q_HEADS=16, NUM_K_HEADS=2, ROT_HALF=24, HALF_PAD=32, IS_NEOX=False, cfg=(2, 4, 4, 4))]
SIGNATURE = {
    "pos_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cache_ptr": "*fp32",
    "streams_ptr": "*i32", "num_tokens": "i32", "pos_stride_s": "i32", "q_stride_t": "i32",
    "q_stride_h": "i32", "k_stride_t": "i32", "k_stride_h": "i32", "cache_stride": "i32",
}  # fmt: skip
ALIGNED = ("pos_ptr", "q_ptr", "k_ptr", "cache_ptr", "streams_ptr", "q_stride_t", "k_stride_t")


def load_kernel(sources: dict[str, str], where: Path):
    """The ``mrope_kernel`` of these two files' texts, written under ``where`` and loaded as
    modules of their own (the mRoPE file's relative import made absolute)."""
    for path, text in sources.items():
        text = text.replace("from ._triton_kernel import", "from _triton_kernel import")
        (where / Path(path).name).write_text(text)
    sys.path.insert(0, str(where))
    try:
        namespace: dict = {"__name__": f"mrope_{where.name}"}
        module_file = where / Path(KERNELS[1]).name
        exec(compile(module_file.read_text(), str(module_file), "exec"), namespace)
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("_triton_kernel", None)
    return namespace["mrope_kernel"]


def ptx(kernel, case: dict) -> list[str]:
    block_t, block_h, head_split, num_warps = case["cfg"]
    constexprs = {k: v for k, v in case.items() if k != "cfg"}
    constexprs.update(BLOCK_T=block_t, BLOCK_H=block_h, HEAD_SPLIT=head_split)
    names = kernel.arg_names
    if "STREAMS" in names:
        constexprs["STREAMS"] = 3
    signature = {n: SIGNATURE.get(n, "constexpr") for n in names}
    source = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1}
    )
    code = compiled.asm["ptx"].split(".section\t.debug")[0]
    return [line for line in code.splitlines() if ".loc" not in line and ".file" not in line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with")
    args = parser.parse_args(argv)

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{args.rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        old_dir, new_dir = Path(tmp, "rev"), Path(tmp, "tree")
        old_dir.mkdir(), new_dir.mkdir()
        old = load_kernel({p: show(p) for p in KERNELS}, old_dir)
        new = load_kernel({p: (ROOT / p).read_text() for p in KERNELS}, new_dir)
        print(f"triton {triton.__version__}, sm_90; {args.rev} against the working tree")
        for case in CASES:
            a, b = ptx(old, case), ptx(new, case)
            shown = {k: v for k, v in case.items() if k not in ("HALF_PAD",)}
            print(f"{shown}: identical {a == b} ({len(a)} and {len(b)} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
