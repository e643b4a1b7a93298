"""Our mRoPE against vLLM 0.26's own ``MRotaryEmbedding`` (its Python layers; skipped without).

Importing vLLM takes seconds, so every test here is ``slow`` and imports it inside. On the CPU
vLLM's Triton kernel runs only under the interpreter in a process where vLLM believes Triton
usable (``CUDA_VISIBLE_DEVICES`` empty): the GPT-J test runs there, in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import get_provider
from kernels.providers import TRITON_MROPE
from kernels.testing import TOLERANCES, assert_rope_close, rope_reference

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MAX_POSITION = 256

# (head_size, rotary_dim, section, interleaved): chunked and interleaved (Qwen2-VL's and
# Qwen3-VL's real sections at head 128), and partial rotary.
LAYOUTS = [
    (128, 128, [16, 24, 24], False),
    (128, 128, [24, 20, 20], True),
    (64, 32, [8, 4, 4], False),
    (64, 32, [6, 5, 5], True),
]


@pytest.fixture(scope="module")
def vllm_layer():
    """``make(head_size, rotary_dim, section, interleaved, is_neox, dtype)`` -> vLLM's layer."""
    rope_module = pytest.importorskip("vllm.model_executor.layers.rotary_embedding")
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        compilation_config=CompilationConfig(custom_ops=["none"]),
    )

    def make(head_size, rotary_dim, section, interleaved, is_neox, dtype):
        parameters = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": section,
            "mrope_interleaved": interleaved,
            "partial_rotary_factor": rotary_dim / head_size,
        }
        with set_current_vllm_config(config):
            layer = rope_module.get_rope(head_size, MAX_POSITION // 4, is_neox, parameters, dtype)
        assert type(layer).__name__ == "MRotaryEmbedding" and layer.rotary_dim == rotary_dim
        return layer

    return make


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"d{x[0]}_r{x[1]}_{x[2]}_{x[3]}")
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ours_equals_vllm_forward_native(vllm_layer, layout, is_neox, dtype):
    head_size, rotary_dim, section, interleaved = layout
    layer = vllm_layer(head_size, rotary_dim, section, interleaved, is_neox, dtype)
    cache = layer.cos_sin_cache  # the layer's own, in its dtype
    num_heads, num_kv_heads, num_tokens = 4, 2, 11
    g = torch.Generator().manual_seed(0)
    for text_only in (False, True):
        positions = torch.randint(0, cache.shape[0], (3, num_tokens), generator=g)
        if text_only:
            positions = positions[0].contiguous()
        query = torch.randn(num_tokens, num_heads * head_size, generator=g).to(dtype)
        key = torch.randn(num_tokens, num_kv_heads * head_size, generator=g).to(dtype)
        expected_q, expected_k = rope_reference(
            positions, query, key, cache, head_size, is_neox,
            mrope_section=section, mrope_interleaved=interleaved,
        )  # fmt: skip
        vllm_q, vllm_k = layer.forward_native(positions, query.clone(), key.clone())
        # vLLM's math runs in the layer's dtype: within the reference tolerances too.
        assert_rope_close(vllm_q, expected_q, dtype, "vLLM query")
        assert_rope_close(vllm_k, expected_k, dtype, "vLLM key")
        for name in ("torch", TRITON_MROPE):
            q, k = query.clone(), key.clone()
            get_provider(name).apply(
                positions, q, k, cache, head_size=head_size, is_neox=is_neox,
                mrope_section=section, mrope_interleaved=interleaved,
            )  # fmt: skip
            assert_rope_close(q, expected_q, dtype, f"{name} query")
            assert_rope_close(k, expected_k, dtype, f"{name} key")
            atol, rtol = TOLERANCES[dtype]
            torch.testing.assert_close(q, vllm_q, atol=2 * atol, rtol=2 * rtol)
            torch.testing.assert_close(k, vllm_k, atol=2 * atol, rtol=2 * rtol)


# Runs in a process where vLLM imports the real Triton (interpreted): vLLM's own triton_mrope
# (what forward_cuda runs on [3, T] positions) against the float64 reference, for both styles;
# our kernel for GPT-J; and the vllm_mrope provider's callable for NeoX on fused-qkv views.
_SCRIPT = r"""
import json, torch
from vllm.model_executor.layers.rotary_embedding.mrope import triton_mrope
from kernels import RopeSpec, cos_sin_cache, get_provider
from kernels.providers._vllm_mrope import VllmMropeProvider
from kernels.testing import rope_reference

def worst(got, expected):
    return float((got.double().reshape(expected.shape) - expected).abs().max())

out = {}
section, head, hq, hk, n = (8, 4, 4), 32, 4, 2, 9
g = torch.Generator().manual_seed(0)
cache = cos_sin_cache(64, 32)
positions = torch.randint(0, 64, (3, n), generator=g)
qkv = torch.randn(n, (hq + 2 * hk) * head, generator=g)
for is_neox in (True, False):
    query, key = qkv[:, : hq * head], qkv[:, hq * head : (hq + hk) * head]
    eq, ek = rope_reference(positions, query, key, cache, head, is_neox, mrope_section=section)
    cos, sin = cache[positions].chunk(2, dim=-1)
    q, k = triton_mrope(query.clone(), key.clone(), cos, sin, list(section), head, 32, False)
    style = "neox" if is_neox else "gptj"
    out[f"vllm_{style}"] = max(worst(q, eq), worst(k, ek))
    q, k = query.clone(), key.clone()
    get_provider("triton_mrope").apply(positions, q, k, cache, head_size=head, is_neox=is_neox,
                                       mrope_section=section)
    out[f"ours_{style}"] = max(worst(q, eq), worst(k, ek))
spec = RopeSpec(head, 32, hq, hk, True, torch.float32, mrope_section=section)
fn = VllmMropeProvider().build(spec, {})
for text_only in (False, True):
    pos = positions[0].contiguous() if text_only else positions
    fused = qkv.clone()
    query, key = fused[:, : hq * head], fused[:, hq * head : (hq + hk) * head]
    eq, ek = rope_reference(pos, query, key, cache, head, True, mrope_section=section)
    fn(pos, query, key, cache)
    untouched = torch.equal(fused[:, (hq + hk) * head :], qkv[:, (hq + hk) * head :])
    out[f"provider_{'text' if text_only else '3t'}"] = max(worst(query, eq), worst(key, ek))
    out[f"provider_{'text' if text_only else '3t'}_v_untouched"] = untouched
print("RESULT " + json.dumps(out))
"""


def test_gptj_mrope_is_right_with_ours_and_wrong_with_vllms_triton():
    pytest.importorskip("vllm")
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # vLLM then keeps the real Triton without a GPU
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    errors = json.loads(lines[-1].removeprefix("RESULT "))
    atol = TOLERANCES[torch.float32][0]
    # vLLM's kernel is right for NeoX (so it ran as vLLM runs it) and wrong for GPT-J.
    assert errors["vllm_neox"] < atol, errors
    assert errors["vllm_gptj"] > 0.1, errors
    assert errors["ours_neox"] < atol and errors["ours_gptj"] < atol, errors
    # The vllm_mrope provider's callable: in place on fused-qkv views, v columns untouched.
    assert errors["provider_3t"] < atol and errors["provider_text"] < atol, errors
    assert errors["provider_3t_v_untouched"] and errors["provider_text_v_untouched"], errors
    # And the selector never runs it for GPT-J: the provider refuses the style.
    spec_reason = get_provider("vllm_mrope").unsupported_reason
    from kernels import RopeSpec

    gptj = RopeSpec(32, 32, 4, 2, False, torch.float32, mrope_section=(8, 4, 4))
    assert "49290" in spec_reason(gptj)
