# Sourced by the device scripts after ../shared/gpu's set-up calls: two things those calls leave
# undone.
#
# vLLM's Python files arrive in /tmp/site without their package metadata, and vLLM reads its own
# version (importlib.metadata) while it checks Triton: without a dist-info that read raises,
# vLLM takes it for a broken Triton, swaps in its placeholder module, and its Triton kernels
# (triton_mrope, behind MRotaryEmbedding.forward_cuda) fail on `triton.next_power_of_2`.
export PYTHONUNBUFFERED=1
vllm_info=/tmp/site/vllm-0.26.0.dist-info
if [ -d /tmp/site/vllm ] && [ ! -d "$vllm_info" ]; then
  mkdir -p "$vllm_info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' \
    "$(sed -n "s/^__version__ = version = '\(.*\)'$/\1/p" /tmp/site/vllm/_version.py)" \
    > "$vllm_info/METADATA"
fi

# FlashInfer's RoPE module, built on an earlier start (tune.sh returns it as fi_cache.tar.xz; carry
# it in .tune/), goes to its AOT directory: its JIT would rebuild it, about 40 s a start.
fi_aot=/tmp/site/flashinfer/data/aot/rope/rope.so
if [ -f .tune/fi_cache.tar.xz ] && [ -d /tmp/site/flashinfer ] && [ ! -f "$fi_aot" ]; then
  mkdir -p /tmp/fi_cache "$(dirname "$fi_aot")" && tar -C /tmp/fi_cache -xJf .tune/fi_cache.tar.xz
  find /tmp/fi_cache -path "*/cached_ops/rope/rope.so" -exec cp {} "$fi_aot" \; -quit
fi
