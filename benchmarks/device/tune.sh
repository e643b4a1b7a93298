#!/usr/bin/env bash
# A resumable stretch of `python -m autotune` (the default space unless flags say otherwise) on
# whatever GPU this machine has. Run from the repository root on the GPU machine, after
# ../shared/gpu's two set-up calls:
#
#   bash benchmarks/device/tune.sh SECONDS [autotune flags...]
#
# The journal lives in /tmp/tune and is returned compressed in $OUT as
# tune_<device>_studies.journal.xz; a later call (on a fresh machine too) resumes from that file
# carried in .tune/, else from the committed one in benchmarks/results/. SIGINT after SECONDS
# stops after the trial in flight and writes what is finished to /tmp/tune/configs (copied to
# $OUT). WARM_FROM=<file.model.json> warm-starts the studies from another device's
# performance model (installed under this device's model name in a directory searched first).
set -u
. "$(dirname "$0")/site.sh"
seconds=${1:?usage: tune.sh SECONDS [autotune flags...]}
shift
device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
echo "device: $device"
journal=tune_${device}_studies.journal
mkdir -p /tmp/tune/configs /tmp/tune/warm
if [ ! -f /tmp/tune/studies.journal ]; then
  for archive in ".tune/$journal.xz" "benchmarks/results/$journal.xz"; do
    if [ -f "$archive" ]; then
      xz -dc "$archive" > /tmp/tune/studies.journal && echo "resuming from $archive" && break
    fi
  done
fi
for table in .tune/"$device".json configs/"$device".json; do
  if [ -f "$table" ] && [ ! -f /tmp/tune/configs/"$device".json ]; then
    cp "$table" /tmp/tune/configs/
  fi
done
if [ -n "${WARM_FROM:-}" ]; then
  cp "$WARM_FROM" "/tmp/tune/warm/$device.model.json"
  export ROPE_AUTOTUNE_CONFIG_DIR=/tmp/tune/warm
fi
start=$(date +%s)
timeout -s INT "$seconds" python3 -m autotune --device cuda:0 --timing graph \
  --storage /tmp/tune/studies.journal --output /tmp/tune/configs --save-path /tmp/tune/csv \
  --seed 0 "$@" 2>&1 | tr '\r' '\n' | grep -v "trial/s\]$" | tail -40
echo "tuning wall time: $(( $(date +%s) - start )) s"
xz -T0 -6 -c /tmp/tune/studies.journal > "$OUT/$journal.xz"
cp /tmp/tune/configs/"$device"*.json "$OUT/" 2>/dev/null
if find ~/.cache/flashinfer -path "*/cached_ops/rope/rope.so" 2>/dev/null | grep -q .; then
  tar -C ~/.cache/flashinfer -cf - . | xz -T0 -3 > "$OUT/fi_cache.tar.xz"
elif find /tmp/fi_cache -path "*/cached_ops/rope/rope.so" 2>/dev/null | grep -q .; then
  tar -C /tmp/fi_cache -cf - . | xz -T0 -3 > "$OUT/fi_cache.tar.xz"
fi
ls -la "$OUT"
