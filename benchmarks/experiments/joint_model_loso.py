"""Does another device's data help a device's performance model? Leave-one-shape-out on the CPU.

For each shape of the target journal (a spec without its dtype: bf16 and fp16 left out
together), three models are fit without that shape and each picks, per bucket of the shape,
among the candidates the target journal measured there (the ``restricted`` score of
``benchmarks/perf_model_loso.py``): the target's own rows (``own``), the other device's rows
(``other``: a transferred model), and both together (``joint``; the features describe the
call and the config, and both devices have the same SM count, so the trees see the two devices'
times for one call as two samples). The score is the pick's measured time over the bucket's
measured best, so the result is a replay of GPU measurements, not a prediction.

    xz -dc benchmarks/results/tune_NVIDIA_H100_80GB_HBM3_studies.journal.xz > /tmp/h100.journal
    xz -dc benchmarks/results/tune_NVIDIA_H200_studies.journal.xz > /tmp/h200.journal
    python benchmarks/experiments/joint_model_loso.py /tmp/h100.journal /tmp/h200.journal

(``results/joint_model_loso_h100.txt`` read the H100 journal of commit 3a4357d, before
Pythia-410m's studies joined it: ``git show 3a4357d:benchmarks/results/<that file>``.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autotune.perf_model_fit import fit_model, measurements_from_storage
from autotune.storage import open_storage
from kernels import RopeSpec
from kernels.perf_model import PerfModel


def shape_of(spec_key: str) -> str:
    return spec_key.rsplit("_", 1)[0]


def score(picks: list[float]) -> str:
    geo = math.exp(statistics.fmean(math.log(r) for r in picks))
    return (
        f"geomean {geo:.4f}, worst {max(picks):.3f}, within 2%: "
        f"{sum(r <= 1.02 for r in picks)} of {len(picks)}, over 10%: {sum(r > 1.1 for r in picks)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the journal of the device scored (decompressed)")
    parser.add_argument("other", help="another device's journal (decompressed)")
    args = parser.parse_args()
    rows, meta = measurements_from_storage(open_storage(args.target, create=False))
    other, other_meta = measurements_from_storage(open_storage(args.other, create=False))
    print(f"target {meta.get('device_name')}: {len(rows)} rows; other "
          f"{other_meta.get('device_name')}: {len(other)} rows")  # fmt: skip
    buckets = defaultdict(list)
    for r in rows:
        buckets[(r.spec_key, r.tokens)].append(r)
    ratios: dict[str, list[float]] = defaultdict(list)
    per_shape = []
    for shape in sorted({shape_of(k) for k, _ in buckets}):
        models = {
            "own": [r for r in rows if shape_of(r.spec_key) != shape],
            "other": [r for r in other if shape_of(r.spec_key) != shape],
        }
        models["joint"] = models["own"] + models["other"]
        line = {}
        for name, train in models.items():
            model = PerfModel(fit_model(train, meta))
            picked = []
            for (key, tokens), measured in sorted(buckets.items()):
                if shape_of(key) != shape:
                    continue
                spec = RopeSpec.from_key(key)
                best = min(r.median_us for r in measured)
                choice = min(
                    measured, key=lambda r: model.predict_us(r.provider, spec, tokens, r.config)
                )
                picked.append(choice.median_us / best)
            ratios[name] += picked
            line[name] = math.exp(statistics.fmean(math.log(r) for r in picked))
        per_shape.append((shape, line))
        print(shape, " ".join(f"{n} {v:.4f}" for n, v in line.items()), flush=True)
    print("\nthe model choosing among each bucket's measured candidates, measured time / best:")
    for name, picks in ratios.items():
        print(f"{name}: {score(picks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
