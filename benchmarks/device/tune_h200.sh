#!/usr/bin/env bash
# The shipped H200 table: the model presets and the seed benchmark's 48-head spec, bf16, nine
# token buckets, graph timing (entries not re-tuned stay in the table). Resumable: the Optuna
# journal lives in /tmp/tune (and is copied to $OUT); SIGINT after $1 seconds stops it after
# the trial in flight with what is finished written to the table. TUNE_DTYPE, TUNE_TOKENS,
# TUNE_TRIALS and TUNE_SHAPES override the dtype, the buckets, the budget (a larger budget
# resumes complete studies) and the shape flags, e.g. TUNE_SHAPES="--model deepseek-v2";
# TUNE_SPACE=default drops them all for the tuner's default space; TUNE_ARGS adds flags (e.g.
# "--repeats 50").
# A fresh machine resumes from a journal carried in .tune/ (studies.journal or the .xz a
# previous call returned), else from the committed journal of the run behind
# configs/NVIDIA_H200.json.
# Run it as `TUNE_SECONDS=530 bash benchmarks/device/device_run.sh tune`.
mkdir -p /tmp/tune/configs
test -f /tmp/tune/studies.journal || cp .tune/studies.journal /tmp/tune/ 2>/dev/null \
  || { test -f .tune/tune_h200_studies.journal.xz \
       && xz -dc .tune/tune_h200_studies.journal.xz > /tmp/tune/studies.journal; } \
  || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), \
       open(sys.argv[2], 'wb'))" benchmarks/results/tune_h200_studies.journal.xz \
       /tmp/tune/studies.journal
test -f /tmp/tune/configs/NVIDIA_H200.json || cp .tune/NVIDIA_H200.json /tmp/tune/configs/ \
  2>/dev/null || cp configs/NVIDIA_H200.json /tmp/tune/configs/
# FlashInfer JIT-compiles its RoPE module on a fresh machine (36-47 s of every start, from the
# journal's phase_s). Its JIT always runs ninja, which rebuilds against the freshly installed
# sources; a module in its AOT directory is loaded as it is. So a module built on an earlier
# start (.tune/fi_cache.tar.xz, which this returns) goes there.
fi_aot=/tmp/site/flashinfer/data/aot/rope/rope.so
if [ -f .tune/fi_cache.tar.xz ] && [ -d /tmp/site/flashinfer ] && [ ! -f "$fi_aot" ]; then
  mkdir -p /tmp/fi_cache "$(dirname "$fi_aot")" && tar -C /tmp/fi_cache -xJf .tune/fi_cache.tar.xz
  find /tmp/fi_cache -path "*/cached_ops/rope/rope.so" -exec cp {} "$fi_aot" \; -quit
fi
shapes=(--model pythia-6.9b --model phi-2 --model deepseek-v2 --model gpt-j-6b
  --model llama-3-8b --model qwen2.5-7b --model gemma-2-9b --model llama-3-70b
  --head-size 128 --rotary-dim 32 --num-heads 48)
test -n "${TUNE_SHAPES:-}" && read -r -a shapes <<< "$TUNE_SHAPES"
space=("${shapes[@]}" --dtype "${TUNE_DTYPE:-bf16}"
  --tokens "${TUNE_TOKENS:-1,4,16,64,256,1024,4096,16384,65536}"
  --trials "${TUNE_TRIALS:-20}" --providers triton,vllm,flashinfer,torch)
# TUNE_SPACE=default: the tuner's own default space, budget and providers; its studies start
# from these (autotune.warm_start starts a study from one over fewer providers).
test "${TUNE_SPACE:-}" = default && space=()
timeout -s INT "${1:-300}" python3 -m autotune --device cuda:0 "${space[@]}" --timing graph \
  --storage /tmp/tune/studies.journal --output /tmp/tune/configs --save-path /tmp/tune/csv \
  --seed 0 ${TUNE_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "trial/s\]$" | tail -40
# The journal outgrows what a device call returns (over 60 MB); compressed it is about 4.6 MB.
xz -T0 -6 -c /tmp/tune/studies.journal > "$OUT/tune_h200_studies.journal.xz"
cp /tmp/tune/configs/*.json "$OUT/" 2>/dev/null
cp /tmp/tune/csv/*.csv "$OUT/" 2>/dev/null
# A module loaded from the AOT directory leaves no build in ~/.cache: pass on the one unpacked
# above (on this machine's first call, so also when a later call does not carry .tune), else
# FlashInfer's own build; never an archive without the module.
if find /tmp/fi_cache -path "*/cached_ops/rope/rope.so" 2>/dev/null | grep -q .; then
  tar -C /tmp/fi_cache -cf - . | xz -T0 -3 > "$OUT/fi_cache.tar.xz"
elif find ~/.cache/flashinfer -path "*/cached_ops/rope/rope.so" 2>/dev/null | grep -q .; then
  tar -C ~/.cache/flashinfer -cf - . | xz -T0 -3 > "$OUT/fi_cache.tar.xz"
fi
ls -la "$OUT"
