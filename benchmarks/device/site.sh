# Sourced by the device scripts after ../shared/gpu's set-up calls.
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
