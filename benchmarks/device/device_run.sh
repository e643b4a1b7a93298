#!/usr/bin/env bash
# Device calls on a GPU machine, one stage per call (each fits the 10-minute limit), after
# ../shared/gpu's two set-up calls (its part b carries platformdirs, Optuna, FlashInfer and
# vLLM's Python files into /tmp/site); everything lands under $OUT. From the repository root:
#
#   bash benchmarks/device/device_run.sh tests         # GPU tests, eager launch and selector overhead
#   bash benchmarks/device/device_run.sh integrations  # vLLM's layers and a transformers model, with and without us
#   bash benchmarks/device/device_run.sh block         # a compiled vLLM attention block: vLLM's RoPE, its op, ours
#   bash benchmarks/device/device_run.sh mrope         # mRoPE: ours, vLLM's forward_cuda, Inductor's forward_native
#   bash benchmarks/device/device_run.sh aliasing      # the compiled-aliasing fault with four op bodies
#   bash benchmarks/device/device_run.sh transfer      # unseen shapes with own/transferred/default data; first use
#   bash benchmarks/device/device_run.sh small-slices  # tune Pythia-410m's rotary 16, refit, unseen shapes
#   bash benchmarks/device/device_run.sh untuned       # cold tuning time, unseen shapes (carry .tune_loso)
#   bash benchmarks/device/device_run.sh verify        # the shipped table re-timed; eager small tokens
#   bash benchmarks/device/device_run.sh small-tokens  # Triton sweep vs FlashInfer/vLLM, 16-1024 tokens
#   bash benchmarks/device/device_run.sh losing        # sweep where FlashInfer won a bucket (revision 2)
#   bash benchmarks/device/device_run.sh defaults      # the untuned Triton default vs FlashInfer/vLLM
#   bash benchmarks/device/device_run.sh search        # the search against an exhaustive sweep
#   bash benchmarks/device/device_run.sh eager         # eager entries for vllm_layer.py's models; the vllm provider
#   bash benchmarks/device/device_run.sh ab            # kernel speed: this tree against .ab/main (carry .ab)
#   TUNE_SECONDS=400 bash benchmarks/device/device_run.sh tune   # a resumable stretch of tune.sh
set -u
. "$(dirname "$0")/site.sh"
case "$1" in
  tests)
    timeout "${TESTS_SECONDS:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider \
      --durations=10 tests > "$OUT/pytest_gpu.log" 2>&1
    tail -25 "$OUT/pytest_gpu.log"
    python3 benchmarks/launch_overhead.py 2>&1 | tee "$OUT/launch_overhead.log" | tail -12
    python3 benchmarks/selector_overhead.py --device cuda:0 --max-overhead-us 1.0 2>&1 \
      | tee "$OUT/selector_overhead.log" | tail -12
    python3 benchmarks/selector_overhead.py --device cuda:0 --provider vllm 2>&1 \
      | tee -a "$OUT/selector_overhead.log" | tail -8 ;;
  integrations)
    timeout 300 python3 benchmarks/vllm_layer.py --device cuda:0 --out "$OUT/vllm_layer" 2>&1 \
      | tail -60
    timeout 200 python3 benchmarks/transformers_model.py --device cuda:0 2>&1 | tail -25 ;;
  block)
    # An attention block as vLLM's models build it, compiled, CUDA-graph timed: vLLM's default
    # RoPE (forward_native under Inductor), vLLM's op and ours; rows are written as they come.
    timeout 420 python3 benchmarks/vllm_block.py --device cuda:0 --out "$OUT" 2>&1 \
      | grep -v "INFO\|WARNING" | tail -40 ;;
  mrope)
    timeout 150 python3 benchmarks/mrope.py --device cuda:0 --out "$OUT" 2>&1 | tail -40
    timeout 200 python3 benchmarks/vllm_layer.py --device cuda:0 --out "$OUT/vllm_layer_mrope" \
      --models qwen2.5-vl-7b,qwen3-vl-8b,qwen2-vl-2b --tokens 1,16,256,4096,16384 2>&1 \
      | grep -v "INFO\|WARNING" | tail -40 ;;
  aliasing)
    timeout 240 python3 benchmarks/experiments/aliasing_repro.py 2>&1 | tee "$OUT/aliasing.txt"
    timeout 300 python3 benchmarks/experiments/aliasing_repro.py --sanitize --bodies ours,vllm \
      --tokens 256,4096 2>&1 | tee "$OUT/aliasing_sanitized.txt" ;;
  transfer)
    # This device's data against the nearest device's and the untuned default (its own column
    # only where it has a table), then tuning on first use against the device's full tuning
    # (the shipped table, else a tuning run's table carried in .tune/: its complete specs).
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
    data=transfer,default
    [ -f "configs/$device.json" ] && data=own,$data
    timeout "${UNSEEN_SECONDS:-300}" python3 benchmarks/unseen_shapes.py --device cuda:0 \
      --data "$data" 2>&1 | tee "$OUT/unseen_shapes.log" | tail -45
    [ "${FIRST_USE_SECONDS:-240}" = 0 ] && exit 0
    table=configs/$device.json
    [ -f "$table" ] || table=.tune/$device.json
    timeout "${FIRST_USE_SECONDS:-240}" python3 benchmarks/first_use.py --device cuda:0 \
      --table "$table" --limit "${FIRST_USE_SPECS:-8}" --out "$OUT/first_use.txt" \
      --csv "$OUT/first_use.csv" 2>&1 | tail -25 ;;
  small-slices)
    # Pythia-410m's spec (16 heads of 64, rotary 16: 32-byte slices) added to this device's
    # tuning journal (tune.sh resumes .tune/'s), the model refit on the whole journal, then the
    # unseen shapes with that model (own) beside the nearest device's (transfer).
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
    bash benchmarks/device/tune.sh "${TUNE_SECONDS:-150}" --head-size 64 --rotary-dim 16 \
      --num-heads 16 --num-kv-heads 16 --dtype bf16 | tail -8
    python3 -m autotune export --storage /tmp/tune/studies.journal --output /tmp/tune/export \
      --quiet && cp "/tmp/tune/export/$device.model.json" configs/ \
      && cp "/tmp/tune/configs/$device.json" configs/ && cp "configs/$device.model.json" "$OUT/"
    timeout "${UNSEEN_SECONDS:-240}" python3 benchmarks/unseen_shapes.py --device cuda:0 \
      --data own,transfer 2>&1 | tee "$OUT/unseen_shapes.log" | tail -45 ;;
  untuned)
    # The compiled vLLM override's arguments (a fault is named by the call that made it), the
    # tuning time of one spec from a cold start against the shipped table (the model in
    # .tune_loso was fit without that spec), and unseen model shapes against FlashInfer/vLLM.
    CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 benchmarks/experiments/compiled_layer_args.py \
      2>&1 | grep -v "INFO\|WARNING" | tee "$OUT/compiled_layer_args.txt" | tail -30
    timeout 300 python3 benchmarks/tune_time.py --device cuda:0 --model-dir .tune_loso \
      --spec q28_kv4_d128_r128_neox_bfloat16 2>&1 | tail -25
    timeout 200 python3 benchmarks/unseen_shapes.py --device cuda:0 2>&1 | tail -50 ;;
  verify)
    # The shipped table re-timed and gated on this machine; eager winners at small token counts
    # against the graph ones; the selector's per-call cost.
    timeout -s INT 330 python3 -m autotune verify --device cuda:0 --table configs/NVIDIA_H200.json \
      --save-path "$OUT" > "$OUT/verify_h200.txt" 2>&1; echo "exit status $?" >> "$OUT/verify_h200.txt"
    tail -30 "$OUT/verify_h200.txt"
    timeout 150 python3 benchmarks/tune_time.py --device cuda:0 --model-dir configs --timing eager \
      --reference-timing graph --tokens 1,4,16,64,256 --spec q32_kv8_d128_r128_neox_bfloat16 \
      2>&1 | tail -12
    python3 benchmarks/selector_overhead.py --device cuda:0 --max-overhead-us 1.0 2>&1 \
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
    timeout -s INT "${SEARCH_SECONDS:-300}" python3 benchmarks/experiments/search_vs_exhaustive.py \
      --device cuda:0 --spec q32_kv8_d128_r128_neox_bfloat16 \
      --spec q16_kv16_d256_r64_gptj_bfloat16 --tokens 256,16384 --repeats 10 \
      --json "$OUT/search_vs_exhaustive_h200.json" ;;
  eager)
    # Eager-timed entries (resuming this device's journal) for the specs of vllm_layer.py's five
    # text models, merged into this tree's table; the vllm provider's GPU tests and host cost
    # per call; then the layers' rows. The eager search is between Triton and vLLM's op (the
    # contest at small token counts is their host cost), to fit a call.
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
    bash benchmarks/device/tune.sh "${TUNE_SECONDS:-300}" --timing eager --providers triton,vllm \
      --model llama-3-8b --model qwen2.5-7b --model phi-2 --model gpt-j-6b \
      --tensor-parallel-size 1 --dtype bf16 | tail -6
    cp "/tmp/tune/configs/$device.json" configs/
    timeout "${TEST_SECONDS:-90}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_providers.py \
      -k "matrix_gpu and vllm" 2>&1 | tail -2
    python3 benchmarks/selector_overhead.py --device cuda:0 --provider vllm 2>&1 \
      | tee "$OUT/selector_overhead.log" | tail -8
    timeout "${LAYER_SECONDS:-240}" python3 benchmarks/vllm_layer.py --device cuda:0 --no-compiled \
      --out "$OUT/vllm_layer" 2>&1 | grep -v "INFO\|WARNING" | tail -30 ;;
  ab)
    # Another revision's kernels package, made here with
    #   mkdir -p .ab/main && git archive main kernels | tar -x -C .ab/main
    timeout "${AB_SECONDS:-540}" python3 benchmarks/experiments/kernel_ab.py \
      --old "${AB_OLD:-.ab/main}" --rounds "${AB_ROUNDS:-2}" 2>&1 | grep -v Warning ;;
  tune)
    bash benchmarks/device/tune.sh "${TUNE_SECONDS:-300}" ;;
  *)
    echo "usage: device_run.sh tests|integrations|block|mrope|aliasing|transfer|untuned|verify|small-tokens|losing|defaults|search|eager|ab|tune" >&2
    exit 2 ;;
esac
