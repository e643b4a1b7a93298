"""How long ``python -m autotune`` takes to tune one spec from a cold start, and how its table
compares with a reference table of the same spec (the shipped 48-trial table).
An mRoPE spec key (``..._mrope16-24-24``) tunes that mRoPE spec.

The tuner runs in a subprocess with a fresh study storage, fresh Triton and Inductor caches
and ``ROPE_AUTOTUNE_CONFIG_DIR`` pointing at ``--model-dir`` (so its warm start uses that
directory's performance model, e.g. one fit without this spec). FlashInfer's one-time JIT build
is done first, outside the timed run. Reported: the wall time, and per bucket the new table's
best time over the reference's, with vLLM's op (untuned, in both tables) as the drift between
the two machine starts.

    python benchmarks/tune_time.py --device cuda:0 --model-dir .tune_loso \\
        --spec q28_kv4_d128_r128_neox_bfloat16 --reference configs/NVIDIA_H200.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import RopeSpec  # noqa: E402


def _warm_flashinfer(spec: RopeSpec, device: str) -> float:
    """Build FlashInfer's RoPE module (its JIT), outside the timed run; seconds taken."""
    code = (
        "import torch; from kernels import get_provider, RopeSpec, cos_sin_cache\n"
        f"spec, dev = RopeSpec.from_key({spec.key!r}), {device!r}\n"
        "p = get_provider('flashinfer')\n"
        "if p.unavailable_reason(dev) is None:\n"
        "    q = torch.randn(4, spec.num_heads * spec.head_size, device=dev).to(spec.dtype)\n"
        "    k = torch.randn(4, spec.num_kv_heads * spec.head_size, device=dev).to(spec.dtype)\n"
        "    pos = torch.arange(4, device=dev)\n"
        "    p.apply(pos, q, k, cos_sin_cache(64, spec.rotary_dim, device=dev),\n"
        "            head_size=spec.head_size, is_neox=spec.is_neox)\n"
        "    torch.cuda.synchronize()\n"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
    return time.perf_counter() - start


def spec_flags(spec: RopeSpec) -> list[str]:
    """The ``python -m autotune`` flags that name ``spec`` alone (its mRoPE layout included)."""
    flags = [
        "--head-size", str(spec.head_size), "--rotary-dim", str(spec.rotary_dim),
        "--num-heads", str(spec.num_heads), "--num-kv-heads", str(spec.num_kv_heads),
        "--is-neox-style" if spec.is_neox else "--no-is-neox-style", "--dtype", spec.dtype_name,
    ]  # fmt: skip
    if spec.mrope_section is not None:
        flags += ["--mrope-section", ",".join(map(str, spec.mrope_section))]
        if spec.mrope_interleaved:
            flags.append("--mrope-interleaved")
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--spec", required=True, help="spec key, e.g. q28_kv4_d128_r128_neox_bfloat16"
    )
    parser.add_argument("--model-dir", required=True, type=Path, help="holds the model to use")
    parser.add_argument("--reference", type=Path, default=ROOT / "configs" / "NVIDIA_H200.json")
    parser.add_argument("--timing", default="graph", choices=("graph", "eager"))
    parser.add_argument(
        "--reference-timing", choices=("graph", "eager"), help="default: --timing's entries"
    )
    parser.add_argument("--tokens", default=None, help="buckets (default: the tuner's)")
    parser.add_argument("--trials", type=int, default=None, help="default: the tuner's")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    args = parser.parse_args(argv)
    spec = RopeSpec.from_key(args.spec)
    scratch = Path(tempfile.mkdtemp(prefix="tune_time_"))
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(scratch / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
        "ROPE_AUTOTUNE_CONFIG_DIR": str(args.model_dir.resolve()),
    }
    jit_s = _warm_flashinfer(spec, args.device)
    command = [
        sys.executable, "-m", "autotune", "--device", args.device, *spec_flags(spec),
        "--timing", args.timing, "--storage", str(scratch / "studies.journal"),
        "--output", str(scratch / "out"), "--seed", "0", "--quiet",
    ]  # fmt: skip
    if args.tokens:
        command += ["--tokens", args.tokens]
    if args.trials:
        command += ["--trials", str(args.trials)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start

    (table_path,) = (scratch / "out").glob("*.json")
    new = json.loads(table_path.read_text())["entries"][args.timing][spec.key]
    ref_timing = args.reference_timing or args.timing
    reference = json.loads(args.reference.read_text())["entries"].get(ref_timing, {})
    old = reference.get(spec.key, {})
    lines = [
        f"{spec.key} ({args.timing}) on {args.device}: tuned in {wall:.1f} s from a cold start "
        f"(FlashInfer's JIT beforehand: {jit_s:.1f} s); {len(new)} buckets",
        "tokens | new winner | new us | reference winner | reference us | new/ref | "
        "vLLM new/ref (drift)",
        "---|---|---|---|---|---|---",
    ]
    ratios, drifts = [], []
    for bucket in sorted(new, key=int):
        entry, ref = new[bucket], old.get(bucket)
        if ref is None:
            lines.append(
                f"{bucket} | {entry['provider']} | {entry['median_us']:.2f} | - | - | - | -"
            )
            continue
        ratio = entry["median_us"] / ref["median_us"]
        ratios.append(ratio)
        drift = "-"
        v_new, v_ref = entry["providers_us"].get("vllm"), ref["providers_us"].get("vllm")
        if v_new and v_ref:
            drifts.append(v_new / v_ref)
            drift = f"{v_new / v_ref:.3f}"
        lines.append(
            f"{bucket} | {entry['provider']} | {entry['median_us']:.2f} | {ref['provider']} | "
            f"{ref['median_us']:.2f} | {ratio:.3f} | {drift}"
        )
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        lines.append(f"geomean new/reference over {len(ratios)} buckets: {geo:.4f}")
    if drifts:
        drift = math.exp(sum(map(math.log, drifts)) / len(drifts))
        lines.append(f"geomean vLLM new/reference (the machine starts' drift): {drift:.4f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"tune_time_{spec.key}_{args.timing}"
        (Path(args.out) / f"{name}.txt").write_text(text + "\n")
        (Path(args.out) / f"{name}.json").write_bytes(table_path.read_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
