"""The unseen shapes under the coverage rule, replayed on the CPU from one GPU run.

``select_rope`` lets another device's model predict a spec its own model was fit on no shape
like (``PerfModel.uncovered``). On the H100, with the H200's model the only other, that choice
is exactly the ``transfer`` column of ``unseen_shapes.py --data own,transfer`` for those specs
(the script checks the H200 model's picks against the column's choices), so the rule's speedup
over the faster vendor comes from measured times: ``own`` where the H100's model covers the
spec, ``transfer`` where it does not.

    git show 3a4357d:configs/NVIDIA_H100_80GB_HBM3.model.json > /tmp/h100_before_pythia.json
    python benchmarks/experiments/coverage_replay.py \\
        benchmarks/results/unseen_shapes_h100_own_transfer_default.csv \\
        --own /tmp/h100_before_pythia.json

(``--own`` the H100 model that run read, before Pythia-410m joined its table; the shipped one
covers every unseen shape, so the rule moves nothing with it.)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import RopeSpec
from kernels.perf_model import PerfModel
from kernels.table import shipped_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unseen_shapes import geomean, selector_bucket

OWN, OTHER = "NVIDIA_H100_80GB_HBM3.model.json", "NVIDIA_H200.model.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="unseen_shapes.py's CSV with own and transfer columns")
    parser.add_argument(
        "--own", default=shipped_config_dir() / OWN, help="the model the run's own column read"
    )
    parser.add_argument(
        "--other", default=shipped_config_dir() / OTHER, help="the run's transferred model"
    )
    args = parser.parse_args()
    own, other = PerfModel.load(args.own), PerfModel.load(args.other)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    before, after = [], []
    for r in rows:
        spec = RopeSpec.from_key(r["spec"])
        vendor = min(float(r[c]) for c in ("flashinfer_us", "vllm_us") if r[c] not in ("-", ""))
        moved = bool(own.uncovered(spec)) and not other.uncovered(spec)
        if moved:
            bucket = selector_bucket(int(r["tokens"]))
            names = ["triton", "torch", "torch_compile", "vllm"]
            names += ["flashinfer"] if r["flashinfer_us"] != "-" else []
            pick = other.best(spec, bucket, names)
            recorded = r["transfer_choice"].split(" ", 1)[0]
            assert pick.provider == recorded, (r["model"], r["tokens"], pick, recorded)
            was, now = float(r["ours_us"]), float(r["transfer_us"])
            print(f"{r['model']} at {r['tokens']}: {own.uncovered(spec)} outside the own "
                  f"model's shapes; {was:.2f} -> {now:.2f} us")  # fmt: skip
        before.append(vendor / float(r["ours_us"]))
        after.append(vendor / float(r["transfer_us" if moved else "ours_us"]))
    for name, xs in (("own model everywhere", before), ("coverage rule", after)):
        print(f"{name}: geomean {geomean(xs):.3f}x, worst {min(xs):.3f}x over the faster vendor, "
              f"{sum(x < 0.97 for x in xs)} of {len(xs)} below 0.97x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
