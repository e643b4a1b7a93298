#!/usr/bin/env bash
# One device call on the H200 machine (after ../shared/gpu's two set-up calls): the GPU tests,
# eager launch and selector overhead, then a first stretch of the H200 tuning run.
# The device lacks platformdirs: carry its wheel, built here with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl platformdirs==4.3.6
# and name ".whl" in the call's carry list. TUNE_SECONDS bounds the tuning stretch.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warn
python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/pytest_gpu.log 2>&1; tail -15 $OUT/pytest_gpu.log
python3 benchmarks/launch_overhead.py 2>&1 | tee $OUT/launch_overhead.log
python3 benchmarks/selector_overhead.py --device cuda:0 2>&1 | tee $OUT/selector_overhead.log | tail -8
bash benchmarks/tune_h200.sh ${TUNE_SECONDS:-300}
