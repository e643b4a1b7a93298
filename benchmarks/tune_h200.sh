#!/usr/bin/env bash
# The shipped H200 table: the model presets, bf16, nine token buckets, graph timing (the models
# the first sessions did not reach come first; entries not re-tuned stay in the table). Resumable:
# the Optuna journal lives in /tmp/tune (and is copied to $OUT); SIGINT after $1 seconds stops
# it cleanly with what is finished written to the table. TUNE_DTYPE, TUNE_TOKENS and TUNE_TRIALS
# override the dtype, the buckets and the budget (a larger budget resumes complete studies).
# A fresh machine resumes from a journal carried in .tune/, else from the committed journal
# of the run behind configs/NVIDIA_H200.json.
mkdir -p /tmp/tune/configs
test -f /tmp/tune/studies.journal || cp .tune/studies.journal /tmp/tune/ 2>/dev/null \
  || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), \
       open(sys.argv[2], 'wb'))" benchmarks/results/tune_h200_studies.journal.xz \
       /tmp/tune/studies.journal
test -f /tmp/tune/configs/NVIDIA_H200.json || cp .tune/NVIDIA_H200.json /tmp/tune/configs/ \
  2>/dev/null || cp configs/NVIDIA_H200.json /tmp/tune/configs/
timeout -s INT "${1:-300}" python3 -m autotune --device cuda:0 \
  --model pythia-6.9b --model phi-2 --model deepseek-v2 --model gpt-j-6b \
  --model llama-3-8b --model qwen2.5-7b --model gemma-2-9b --model llama-3-70b \
  --dtype "${TUNE_DTYPE:-bf16}" --tokens "${TUNE_TOKENS:-1,4,16,64,256,1024,4096,16384,65536}" \
  --trials "${TUNE_TRIALS:-16}" \
  --providers triton,vllm,flashinfer,torch --timing graph \
  --storage /tmp/tune/studies.journal --output /tmp/tune/configs --save-path /tmp/tune/csv \
  --seed 0 2>&1 | tr '\r' '\n' | grep -v "trial/s\]$" | tail -40
cp /tmp/tune/studies.journal $OUT/ 2>/dev/null; cp /tmp/tune/configs/*.json $OUT/ 2>/dev/null
cp /tmp/tune/csv/*.csv $OUT/ 2>/dev/null; ls -la $OUT
