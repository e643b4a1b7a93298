"""What the plain-RoPE twin warm start saves an mRoPE study, on one GPU.

Tunes one mRoPE spec twice at the same token buckets and trial count, each in its own process
with a fresh study journal and fresh Triton and Inductor caches: once without a warm start (the
sampler alone, as every mRoPE study ran before), once warm-started from the device's
performance model (``autotune.warm_start.model_candidates``: the model's best ``triton``
configs for the spec's plain twin, measured as ``triton_mrope`` first). Reports per bucket the
study's time (first trial's start to last trial's end, from the journal) and the best time
each run found, so a faster study that finds a worse kernel shows as such.

    PYTHONPATH=$PWD:/tmp/site python benchmarks/experiments/mrope_warm_start.py \\
        --spec q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24 --tokens 1,16,256,4096,16384
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in the child: tune, then each study's span from the journal, as one JSON line.
CHILD = """
import json, sys, time
import optuna
from autotune.storage import open_storage
from autotune.tuning import tune
from kernels import RopeSpec
spec_key, tokens, trials, warm, storage, device = json.loads(sys.argv[1])
start = time.perf_counter()
table = tune([RopeSpec.from_key(spec_key)], tokens, device=device, trials=trials,
             storage=storage, seed=0, progress=False, warm_start=warm)
wall = time.perf_counter() - start
studies = {}
journal = open_storage(storage)
for summary in optuna.get_all_study_summaries(journal):
    study = optuna.load_study(study_name=summary.study_name, storage=journal)
    done = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    studies[summary.study_name] = {
        "seconds": span.total_seconds(), "trials": len(done),
        "tokens": study.user_attrs.get("tokens"),
    }
best = {b: [e["provider"], e["median_us"]] for b, e in table["entries"]["graph"][spec_key].items()}
print("RESULT " + json.dumps({"wall": wall, "studies": studies, "best": best}))
"""


def run(spec: str, tokens: list[int], trials: int, warm: bool, device: str) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="mrope_warm_"))
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(scratch / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
    }
    payload = json.dumps([spec, tokens, trials, warm, str(scratch / "studies.journal"), device])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, payload],
        env=env, cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="an mRoPE spec key")
    parser.add_argument("--tokens", default="1,16,256,4096,16384")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--trials", type=int, default=16, help="counted trials per study")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    import torch

    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    lines = [f"device: {name}; {args.spec}, {args.trials} trials"]
    runs = {label: run(args.spec, tokens, args.trials, warm, args.device) for label, warm in
            (("cold", False), ("twin", True))}  # fmt: skip
    lines += [
        "tokens | cold study s | twin study s | cold best us | twin best us | twin/cold best",
        "---|---|---|---|---|---",
    ]
    spans = {label: sorted(r["studies"].values(), key=lambda s: s["tokens"] or 0)
             for label, r in runs.items()}  # fmt: skip
    ratios = []
    for i, bucket in enumerate(sorted(runs["cold"]["best"], key=int)):
        cold, twin = runs["cold"]["best"][bucket], runs["twin"]["best"][bucket]
        ratios.append(twin[1] / cold[1])
        lines.append(
            f"{bucket} | {spans['cold'][i]['seconds']:.1f} | {spans['twin'][i]['seconds']:.1f} | "
            f"{cold[1]:.2f} ({cold[0]}) | {twin[1]:.2f} ({twin[0]}) | {ratios[-1]:.3f}"
        )
    total = {label: sum(s["seconds"] for s in spans[label]) for label in runs}
    lines.append(
        f"study time: cold {total['cold']:.1f} s, twin {total['twin']:.1f} s "
        f"({total['cold'] / total['twin']:.2f}x); process wall: cold {runs['cold']['wall']:.1f} s,"
        f" twin {runs['twin']['wall']:.1f} s; best twin/cold geomean "
        f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "mrope_warm_start.txt").write_text(text + "\n")
        (Path(args.out) / "mrope_warm_start.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
