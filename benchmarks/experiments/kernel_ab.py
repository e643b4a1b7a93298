"""A/B of the Triton kernels' speed between two source trees, on one GPU: what a change to the
device code costs or gains, before it lands.

Each side is a tree holding a ``kernels`` package (the working tree, and ``--old`` or a
``git worktree`` of ``--rev``). Per case (spec, token count, with and without a key) both sides
build the Triton provider with the same config (the working tree's table pick where it is a
Triton one, else the default config), check it against the float64 reference, and time it
(``kernels.measure.time_rope``: CUDA-graph replay over input sets larger than the L2, median of
50 rounds). Each side runs in a process of its own with an empty Triton cache, the two alternating
``--rounds`` times; per case the report gives each side's median over rounds and their ratio,
then the geometric mean of the ratios, then the seconds of the gate on each config's first
case (its compiles included) per side.

    python benchmarks/experiments/kernel_ab.py --rev main           # where git is
    git archive main kernels | tar -x -C .ab/main                    # for a machine without git:
    python benchmarks/experiments/kernel_ab.py --old .ab/main         # (the tree travels along)

On the CPU (``TRITON_INTERPRET=1 ... --device cpu --tokens 5``) it runs as a smoke check.
With ``$OUT`` set, each process's results are also written there as they come
(``kernel_ab_<side>_<round>.json``) and the report as ``kernel_ab.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENS = (1, 16, 256, 4096, 16384)
# Model presets (autotune.models), bf16, one GPU's heads: GQA, partial rotary (Phi-2: 32 of
# 80), GPT-J style (rotary 64 of 256) and mRoPE.
MODELS = ("llama-3-8b", "qwen2.5-7b", "phi-2", "gpt-j-6b", "qwen2.5-vl-7b")


def _cases(device: str, tokens_list: tuple[int, ...]) -> list[dict]:
    """Every case with the config both sides run (picked here, in the working tree)."""
    import torch

    from autotune.models import model_specs
    from kernels import select_rope
    from kernels.providers import default_triton_config

    cases = []
    specs = model_specs(MODELS, [], tensor_parallel_size=1, dtypes=[torch.bfloat16])
    for name, spec in zip(MODELS, specs, strict=True):
        selector = select_rope(
            spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
            spec.dtype, device, mrope_section=spec.mrope_section,
        )  # fmt: skip
        for tokens in tokens_list:
            for with_key in (True, False):
                pick = selector.explain(tokens, has_key=with_key)
                triton_pick = pick.provider in ("triton", "triton_mrope")
                config = dict(pick.config) if triton_pick else default_triton_config(spec, tokens)
                source = "table" if triton_pick else "default"
                cases.append(dict(model=name, spec=spec.key, tokens=tokens, with_key=with_key,
                                  config=config, source=source))  # fmt: skip
    return cases


def _measure(root: str, cases: list[dict], device: str, out: Path | None) -> dict:
    """With ``root``'s ``kernels`` package: the median microseconds of each case (``"us"``),
    and the seconds of the float64 gate on each config's first case (``"gate_s"``: with a key
    and without, text-only too for mRoPE, as the tuner gates a config; the process starts with
    an empty Triton cache, so these include the config's compiles)."""
    sys.path.insert(0, root)
    import time

    import torch

    from kernels import RopeSpec, get_provider
    from kernels.measure import check_correct, time_rope

    assert Path(sys.modules["kernels"].__file__).is_relative_to(root)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    print(f"{root}: {name}", file=sys.stderr)
    results: dict = {"us": [], "gate_s": []}
    gated = set()
    for case in cases:
        spec = RopeSpec.from_key(case["spec"])
        provider = get_provider("triton_mrope" if spec.is_mrope else "triton")
        fn = provider.callable_for(spec, case["config"])
        config = (case["spec"], json.dumps(case["config"], sort_keys=True))
        start = time.perf_counter()
        check_correct(fn, spec, case["tokens"], device, keyless=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        if config not in gated:
            gated.add(config)
            results["gate_s"].append(time.perf_counter() - start)
        timing = time_rope(fn, spec, case["tokens"], device, with_key=case["with_key"])
        results["us"].append(timing.median_us)
        if out is not None:
            out.write_text(json.dumps(results))
    return results


def _report(cases: list[dict], sides: dict[str, list[dict]]) -> str:
    (old_name, old_results), (new_name, new_results) = sides.items()
    old_runs = [r["us"] for r in old_results]
    new_runs = [r["us"] for r in new_results]
    lines = [f"us per call (median over {len(new_runs)} processes per side of each one's graph-"
             f"replay median); ratio = {new_name} / {old_name}"]  # fmt: skip
    ratios = []
    for i, case in enumerate(cases):
        old = statistics.median(run[i] for run in old_runs)
        new = statistics.median(run[i] for run in new_runs)
        ratios.append(new / old)
        key = "key" if case["with_key"] else "no key"
        lines.append(f"{case['model']:14s} {case['tokens']:6d} {key:6s} {case['source']:7s} "
                     f"{old:9.2f} {new:9.2f}  {new / old:.3f}  {case['config']}")  # fmt: skip
    geomean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    lines.append(f"geomean ratio {geomean:.4f}; min {min(ratios):.3f}, max {max(ratios):.3f}")
    for name, results in sides.items():
        gates = [r["gate_s"] for r in results]
        lines.append(f"gate, first case of each of {len(gates[0])} configs (cold Triton cache): "
                     f"{name}: median {statistics.median(g for run in gates for g in run):.3f} s, "
                     f"total per process {[round(sum(run), 1) for run in gates]} s")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--rev", help="the revision to compare with (a git worktree is made)")
    which.add_argument("--old", help="a tree holding the other side's kernels package")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="token counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # root, cases file, out
    args = parser.parse_args()
    if args.child:
        root, cases_file, out = args.child
        cases = json.loads(Path(cases_file).read_text())
        print(json.dumps(_measure(root, cases, args.device, Path(out) if out else None)))
        return
    if not (args.rev or args.old):
        parser.error("one of --rev and --old is needed")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    with tempfile.TemporaryDirectory() as tmp:
        old = args.old
        if args.rev:
            old = str(Path(tmp) / "rev")
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", old,
                            args.rev], check=True)  # fmt: skip
        try:
            sys.path.insert(0, str(ROOT))
            cases = _cases(args.device, tuple(args.tokens))
            cases_file = Path(tmp) / "cases.json"
            cases_file.write_text(json.dumps(cases))
            sides: dict[str, list[dict]] = {args.rev or args.old: [], "working tree": []}
            for r in range(args.rounds):
                for runs, root in zip(sides.values(), (old, str(ROOT)), strict=True):
                    name = "old" if root == old else "new"
                    out = "" if out_dir is None else str(out_dir / f"kernel_ab_{name}_{r}.json")
                    cache_dir = Path(tmp) / f"triton_cache_{name}_{r}"  # cold: compiles count
                    done = subprocess.run(
                        [sys.executable, __file__, "--device", args.device,
                         "--child", str(Path(root).resolve()), str(cases_file), out],
                        check=True, stdout=subprocess.PIPE, text=True,
                        env={**os.environ, "TRITON_CACHE_DIR": str(cache_dir)},
                    )  # fmt: skip
                    runs.append(json.loads(done.stdout.splitlines()[-1]))
        finally:
            if args.rev:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", old],
                               check=True)  # fmt: skip
    report = _report(cases, sides)
    print(report)
    if out_dir is not None:
        (out_dir / "kernel_ab.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
