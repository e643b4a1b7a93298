#!/usr/bin/env bash
# Device calls on the H200 machine, after ../shared/gpu's two set-up calls, one stage per call
# (each fits the 10-minute limit); everything lands under $OUT.
#
#   bash benchmarks/device_run.sh tests         # GPU tests, eager launch and selector overhead
#   bash benchmarks/device_run.sh small-tokens  # #5 target 3: Triton sweep vs FlashInfer/vLLM
#   bash benchmarks/device_run.sh losing        # #5 target 3: sweep where FlashInfer won a bucket
#   bash benchmarks/device_run.sh defaults      # the untuned Triton default vs FlashInfer/vLLM
#   bash benchmarks/device_run.sh search        # #3: the search against an exhaustive sweep
#   TUNE_SECONDS=400 bash benchmarks/device_run.sh tune   # a resumable stretch of the table run
#   bash benchmarks/device_run.sh compile-ahead # #6: one tuning job with and without --compile-workers
#   bash benchmarks/device_run.sh profile-trial # #6: cProfile of one study (where a trial's time goes)
#   bash benchmarks/device_run.sh first-call    # #6: a Triton config's first call: compile, disk, pool
#   bash benchmarks/device_run.sh overlap-check # #6: timing while compile workers (or spinners) are busy
#   bash benchmarks/device_run.sh pool-throughput # #6: configs/s of the compile pool per worker count
#
# The device lacks platformdirs: carry its wheel, built here with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl platformdirs==4.3.6
# and name ".whl" in the call's carry list.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warn
case "$1" in
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/pytest_gpu.log" 2>&1
    tail -15 "$OUT/pytest_gpu.log"
    python3 benchmarks/launch_overhead.py 2>&1 | tee "$OUT/launch_overhead.log"
    python3 benchmarks/selector_overhead.py --device cuda:0 2>&1 \
      | tee "$OUT/selector_overhead.log" | tail -8 ;;
  small-tokens)
    timeout -s INT "${SWEEP_SECONDS:-420}" python3 benchmarks/roofline.py --device cuda:0 \
      --specs llama-3-8b,qwen2.5-7b,gemma-2-9b,llama-3-70b:tp8 --tokens 16,256,1024 --sweep \
      --repeats 10 --out "$OUT/roofline_small_tokens_h200.csv" 2>&1 | grep -v FAILED ;;
  losing)
    # The buckets of configs/NVIDIA_H200.json (Triton revision 2) that FlashInfer won.
    points=q128_kv1_d64_r64_gptj_bfloat16@256,q128_kv1_d64_r64_gptj_bfloat16@64
    points+=,q64_kv8_d128_r128_neox_bfloat16@64,gemma-2-9b@64,q16_kv2_d128_r128_neox_bfloat16@256
    points+=,llama-3-8b@256,llama-3-8b@64,gemma-2-9b@16,q32_kv4_d128_r128_neox_bfloat16@16
    points+=,q64_kv8_d128_r128_neox_bfloat16@4,q4_kv1_d128_r128_neox_bfloat16@4096
    timeout -s INT "${SWEEP_SECONDS:-480}" python3 benchmarks/roofline.py --device cuda:0 \
      --sweep --repeats 10 --points "$points" --out "$OUT/roofline_losing_h200.csv" 2>&1 \
      | grep -v FAILED ;;
  defaults)
    python3 benchmarks/roofline.py --device cuda:0 --tokens 1,16,256,1024,2048 \
      --specs llama-3-8b,qwen2.5-7b,gemma-2-9b,llama-3-70b:tp8,q32_kv32_d128_r32_neox_bfloat16,gpt-j-6b \
      --out "$OUT/roofline_defaults_h200.csv" 2>&1 | grep -v FAILED ;;
  search)
    timeout -s INT "${SEARCH_SECONDS:-300}" python3 benchmarks/search_vs_exhaustive.py \
      --device cuda:0 --spec q32_kv8_d128_r128_neox_bfloat16 \
      --spec q16_kv16_d256_r64_gptj_bfloat16 --tokens 256,16384 --repeats 10 \
      --json "$OUT/search_vs_exhaustive_h200.json" ;;
  tune)
    bash benchmarks/tune_h200.sh "${TUNE_SECONDS:-300}" ;;
  compile-ahead)
    # The same job from empty Triton caches and storages, with the pool first (it pays any
    # FlashInfer JIT a fresh machine still owes, so the comparison does not favour it).
    for workers in 8 0; do
      scratch=$(mktemp -d)
      start=$SECONDS
      TRITON_CACHE_DIR=$scratch/triton python3 -m autotune --device cuda:0 \
        --model llama-3-8b --model gpt-j-6b --tensor-parallel-size 1 --dtype bf16 \
        --tokens 1,64,1024,16384 --trials 20 --providers triton,vllm,flashinfer,torch \
        --storage "$scratch/s.journal" --output "$scratch/out" --seed 0 --quiet \
        --compile-workers "$workers"
      echo "compile_workers=$workers: $((SECONDS - start)) s"
      python3 -c "import json, sys; t = json.load(open(sys.argv[1]))['entries']['graph']
for s, b in sorted(t.items()):
    print(s, {k: (e['provider'], round(e['median_us'], 2)) for k, e in b.items()})" \
        "$scratch"/out/*.json | tee "$OUT/compile_ahead_w$workers.txt"
    done ;;
  profile-trial)
    # Where a Triton trial's time goes beyond its 0.12 s of timing (--compile-workers did not
    # shorten the run, so perhaps not in compiling): one bucket's study under cProfile.
    scratch=$(mktemp -d)
    python3 -m cProfile -o "$OUT/trial.prof" -m autotune --device cuda:0 --model llama-3-8b \
      --tensor-parallel-size 1 --dtype bf16 --tokens 256 --trials 40 \
      --providers triton,vllm --storage "$scratch/s.journal" --output "$scratch/out" --quiet
    python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative')
s.print_stats(45); s.sort_stats('tottime').print_stats(25)" "$OUT/trial.prof" \
      | tee "$OUT/trial_profile.txt" | head -120 ;;
  first-call)
    python3 benchmarks/first_call.py --device cuda:0 --configs 16 --workers 15 --profile 2>&1 \
      | tee "$OUT/first_call_h200.txt" ;;
  overlap-check)
    # busy compiles (launching, then not), then busy CPU alone (no CUDA): is the speed-up CPU
    # load or the workers' GPU use?
    for busy in compile compile-only spin; do
      python3 benchmarks/overlap_check.py --device cuda:0 --busy "$busy" 2>&1
    done | tee "$OUT/overlap_check_h200.txt" ;;
  pool-throughput)
    python3 benchmarks/pool_throughput.py --device cuda:0 2>&1 | tee "$OUT/pool_throughput_h200.txt" ;;
  *)
    echo "usage: device_run.sh tests|small-tokens|losing|defaults|search|tune|compile-ahead|profile-trial|first-call|overlap-check|pool-throughput" >&2
    exit 2 ;;
esac
