"""Would a margin against the model's Triton pick have helped on the unseen shapes? Replayed on
the CPU from measured results, no GPU.

For a spec its table lacks, the selector takes per bucket the model's predicted fastest: for
Triton the best of a few hundred configs' predictions, for a vendor op its one prediction. The
minimum of many predictions is biased low, so a rule might take the fastest predicted vendor
unless the Triton pick is predicted ``margin`` times faster. Every choice the rule can make
was measured by ``benchmarks/unseen_shapes.py`` (the selection and both vendors), so the rule
is scored on those CSVs with the model that made the selection (cases where today's model
picks another provider than the CSV records are skipped and counted).

    git show 3a4357d:configs/NVIDIA_H100_80GB_HBM3.model.json > /tmp/h100_before_pythia.json
    cd benchmarks/results; python ../experiments/vendor_margin.py \\
      unseen_shapes_h100_own_transfer_default.csv:/tmp/h100_before_pythia.json \\
      unseen_shapes_h200.csv:../../configs/NVIDIA_H200.model.json

(the H100 run read its model before Pythia-410m joined the H100's table.)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import RopeSpec
from kernels.perf_model import PerfModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unseen_shapes import geomean, selector_bucket

MARGINS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
VENDORS = ("flashinfer", "vllm")


def score(rows: list[dict], model: PerfModel) -> tuple[dict[float, list[float]], int]:
    """Per margin, each case's speedup over the faster vendor; and the cases skipped."""
    out: dict[float, list[float]] = {m: [] for m in MARGINS}
    skipped = 0
    for r in rows:
        spec, bucket = RopeSpec.from_key(r["spec"]), selector_bucket(int(r["tokens"]))
        vendor = {n: float(r[f"{n}_us"]) for n in VENDORS if r[f"{n}_us"] not in ("-", "")}
        pick = model.best(spec, bucket, ["triton", *vendor])
        if pick is None or pick.provider != r["ours_choice"].split(" ", 1)[0]:
            skipped += 1
            continue
        predicted = {n: model.predict_us(n, spec, bucket) for n in vendor}
        nearest = min(predicted, key=predicted.get)
        for margin in MARGINS:
            us = float(r["ours_us"])
            if pick.provider == "triton" and predicted[nearest] <= margin * pick.predicted_us:
                us = vendor[nearest]
            out[margin].append(min(vendor.values()) / us)
    return out, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="CSV:MODEL pairs (unseen_shapes CSV, model file)")
    args = parser.parse_args()
    for run in args.runs:
        csv_path, model_path = run.split(":")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        speedups, skipped = score(rows, PerfModel.load(model_path))
        print(f"{csv_path} with {model_path}: {len(rows)} cases, {skipped} skipped")
        for margin, xs in speedups.items():
            print(
                f"  margin {margin:.2f}: geomean {geomean(xs):.3f}x, worst {min(xs):.3f}x, "
                f"{sum(x < 0.97 for x in xs)} of {len(xs)} below 0.97x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
