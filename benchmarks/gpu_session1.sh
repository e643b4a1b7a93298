#!/usr/bin/env bash
# First device session: library APIs, eager launch cost, roofline with a Triton sweep.
set -x
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
T=$(python3 -c 'import triton,os;print(os.path.dirname(triton.__file__))')
grep -n "kernel.run(grid_0" -A2 $T/runtime/jit.py
python3 - <<'PY'
import torch, kernels
print(kernels.list_providers("cuda:0"))
from kernels.providers._vllm import load_vllm_rotary_op
op = load_vllm_rotary_op(); print(getattr(op, "_schemas", None) or op)
PY
python3 benchmarks/launch_overhead.py 2>&1 | tail -12
python3 benchmarks/roofline.py --specs llama3-8b,seed-32h,gptj-16h --tokens 1,4096,32768,65536 --sweep --out $OUT/roofline_sweep1.csv 2>&1 | grep -v "^  .*FAILED.*OutOfRes" | tail -60
