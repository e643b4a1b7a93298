#!/usr/bin/env bash
# Second device session: GPU test suite, launch-cost breakdown, selector overhead.
export PYTHONUNBUFFERED=1
set -o pipefail
python3 -m pytest -m gpu -q -p no:cacheprovider -x tests 2>&1 | tee $OUT/pytest_gpu.log | tail -25
python3 benchmarks/launch_overhead.py 2>&1 | tee $OUT/launch_overhead.log
python3 benchmarks/selector_overhead.py --device cuda:0 2>&1 | tee $OUT/selector_overhead.log | tail -15
