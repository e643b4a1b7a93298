#!/usr/bin/env bash
# Final device session, part 1 (one call): GPU tests, launch and selector overhead, then the
# first stretch of the H200 tuning run (interrupted cleanly by SIGINT; part 2 resumes it).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warn
mkdir -p /tmp/tune && cp -n tune_state/* /tmp/tune/ 2>/dev/null
python3 -m pytest -m gpu -q -p no:cacheprovider tests > $OUT/pytest_gpu.log 2>&1; tail -15 $OUT/pytest_gpu.log
python3 benchmarks/launch_overhead.py 2>&1 | tee $OUT/launch_overhead.log
python3 benchmarks/selector_overhead.py --device cuda:0 2>&1 | tee $OUT/selector_overhead.log | tail -8
bash benchmarks/tune_h200.sh ${TUNE_SECONDS:-300}
