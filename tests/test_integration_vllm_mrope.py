"""The vLLM plugin on vLLM's real ``MRotaryEmbedding`` (vLLM 0.26.0's Python layers; skipped
without): multimodal RoPE, positions ``[3, T]`` or ``[T]``, chunked and interleaved sections,
with and without YaRN scaling.

On the CPU vLLM finds no platform, so with the custom op on a layer's ``forward`` is its
``forward_cuda``: the override, running the ``torch`` provider. On a GPU the override is checked
against vLLM's own ``forward_cuda`` (NeoX; its Triton kernel is wrong for GPT-J) and
``forward_native``, eagerly and under CUDA graph capture.
"""

import pytest
import torch

rope_module = pytest.importorskip("vllm.model_executor.layers.rotary_embedding")

from conftest import vllm_config, vllm_qk  # noqa: E402

from kernels import RopeSelector  # noqa: E402
from kernels.integrations import vllm as plugin  # noqa: E402
from kernels.integrations._vllm_mrope import mrope_native_reason  # noqa: E402
from kernels.testing import TOLERANCES, assert_rope_close, rope_reference  # noqa: E402

MAX_POSITION = 128  # MRotaryEmbedding keeps 4x the rows (video positions run past it)
# No tuning table for the CPU: select_rope warns once per spec and runs the torch provider.
pytestmark = [
    pytest.mark.filterwarnings("ignore::kernels.RopeTableWarning"),
    pytest.mark.usefixtures("vllm_plugin", "fresh_rope_layers"),
]

# name -> (head_size, rope_parameters for get_rope): every one builds an MRotaryEmbedding.
LAYOUTS = {
    "chunked": (64, {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
    "interleaved": (
        64,
        {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
    ),
    "chunked_partial": (
        64,
        {
            "rope_type": "default",
            "mrope_section": [8, 4, 4],
            "partial_rotary_factor": 0.5,
        },
    ),
    "interleaved_partial": (
        64,
        {
            "rope_type": "default",
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
        },
    ),
    "chunked_yarn": (
        64,
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": MAX_POSITION,
            "mrope_section": [8, 12, 12],
        },
    ),
    "interleaved_yarn": (
        64,
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "attn_factor": 0.9,
            "original_max_position_embeddings": MAX_POSITION,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
    ),
}


def make_rope(layout, is_neox=True, dtype=torch.bfloat16, custom_ops=("all",), params=None):
    head_size, parameters = LAYOUTS[layout] if params is None else (64, params)
    with vllm_config(list(custom_ops)):
        return rope_module.get_rope(head_size, MAX_POSITION, is_neox, dict(parameters), dtype)


def make_inputs(rope, num_tokens, num_heads, num_kv_heads, dtype, device, layout, seed=0):
    """positions ``[3, T]`` (three distinct streams), query, key as vLLM passes them
    (``layout``: :func:`conftest.vllm_qk`)."""
    gen = torch.Generator().manual_seed(seed)
    head_size = rope.head_size
    rows = rope.cos_sin_cache.shape[0]
    positions = torch.randint(0, rows, (3, num_tokens), generator=gen).to(device)
    query, key = vllm_qk(num_tokens, num_heads, num_kv_heads, head_size, dtype, device, layout, gen)
    return positions, query, key


def check_against_native(rope, positions, query, key):
    """Run the overridden layer in place and compare it with vLLM's forward_native and with a
    float64 reference on the layer's own cache. Without a key (vLLM's layer asserts one) the
    query is compared with forward_native's on a throwaway key."""
    dtype = query.dtype
    native_key = torch.zeros_like(query) if key is None else key.clone()
    native_q, native_k = rope.forward_native(positions, query.clone(), native_key)
    cache = rope.cos_sin_cache  # converted to the query's dtype by forward_native, as vLLM does
    expected_q, expected_k = rope_reference(
        positions, query, key, cache, rope.head_size, rope.is_neox_style,
        mrope_section=tuple(rope.mrope_section), mrope_interleaved=rope.mrope_interleaved,
    )  # fmt: skip
    out_q, out_k = rope(positions, query, key)
    assert out_q is query and out_k is key  # in place, returned as vLLM's callers use them
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(query, native_q.view(query.shape), atol=atol, rtol=rtol)
    assert_rope_close(query, expected_q, dtype, "query")
    if key is not None:
        torch.testing.assert_close(key, native_k.view(key.shape), atol=atol, rtol=rtol)
        assert_rope_close(key, expected_k, dtype, "key")


# -- what is overridden --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_get_rope_returns_the_override(layout):
    rope = make_rope(layout)
    assert isinstance(rope, rope_module.MRotaryEmbedding)
    assert type(rope) is plugin.registered_overrides()["MRotaryEmbedding"]
    assert type(rope).name == "rotary_embedding"  # the switch users know
    assert rope._forward_method.__func__ is plugin._SelectedMrope.forward_cuda
    assert rope.mrope_interleaved == LAYOUTS[layout][1].get("mrope_interleaved", False)


def test_yarn_layouts_fold_the_magnitude_scale_into_the_cache():
    scaled, plain = make_rope("chunked_yarn"), make_rope("chunked")
    assert scaled.scaling_factor == 4.0 and plain.scaling_factor is None
    assert scaled.mscale != 1.0 and plain.mscale == 1.0
    # MRotaryEmbedding keeps 4x the positions; YaRN's cache spans them times the factor.
    assert plain.cos_sin_cache.shape[0] == 4 * MAX_POSITION
    assert scaled.cos_sin_cache.shape[0] == 4 * MAX_POSITION * 4


def test_the_other_multimodal_classes_stay_vllms():
    """Ernie-4.5-VL's (another section layout), openPangu's interleaved class (its own forward,
    a generated order) and the XD one (four streams) are left to vLLM."""
    from vllm.model_executor.layers.rotary_embedding.ernie45_vl_rope import (
        Ernie4_5_VLRotaryEmbedding,
    )

    with vllm_config(["all"]):
        ernie = Ernie4_5_VLRotaryEmbedding(
            64, 64, MAX_POSITION, 1e4, True, torch.bfloat16, mrope_section=[12, 12, 8]
        )
        pangu = rope_module.get_rope(
            64,
            MAX_POSITION,
            True,
            {"rope_type": "openpangu", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
        )
        xd = rope_module.get_rope(
            64, MAX_POSITION, True, {"rope_type": "xdrope", "alpha": 2.0, "xdrope_section": [8] * 4}
        )
    assert type(ernie) is Ernie4_5_VLRotaryEmbedding
    assert type(pangu) is rope_module.MRotaryEmbeddingInterleaved
    assert type(xd) is rope_module.XDRotaryEmbedding
    for cls in (type(ernie), type(pangu)):
        assert plugin._mrope_path_reason(cls, rope_module.MRotaryEmbedding) is not None


@pytest.mark.parametrize(
    ("custom_ops", "runs_override"),
    [
        (("all",), True),
        (("none", "+rotary_embedding"), True),
        (("none",), "on_by_default"),  # vLLM's default under Inductor
        (("all", "-rotary_embedding"), False),
    ],
)
@pytest.mark.parametrize("on_by_default", [True, False])
def test_the_rotary_embedding_switch_turns_the_override_on_and_off(
    monkeypatch, on_by_default, custom_ops, runs_override
):
    monkeypatch.setattr(plugin, "ON_BY_DEFAULT", on_by_default)
    if runs_override == "on_by_default":
        runs_override = on_by_default
    rope = make_rope("interleaved", custom_ops=custom_ops)
    forward = rope._forward_method.__func__
    assert (forward is plugin._SelectedMrope.forward_cuda) == runs_override
    if not runs_override:
        assert forward is rope_module.MRotaryEmbedding.forward_native


def test_fusion_passes_do_not_touch_mrope():
    """vLLM's fusion passes match its base rotary op only: an mRoPE layer keeps the override."""
    with vllm_config(["none", "+rotary_embedding"], fusion_passes=plugin.FUSION_PASSES):
        rope = rope_module.get_rope(64, MAX_POSITION, True, dict(LAYOUTS["chunked"][1]))
    assert rope._forward_method.__func__ is plugin._SelectedMrope.forward_cuda


def test_a_layout_the_spec_does_not_name_keeps_vllms_forward_cuda():
    """vLLM accepts interleaved sections whose time section is not the largest (its slices then
    place fewer frequencies than the sections say); RopeSpec refuses them: vLLM's path runs."""
    params = {"rope_type": "default", "mrope_section": [8, 12, 12], "mrope_interleaved": True}
    rope = make_rope(None, params=params)
    assert type(rope) is plugin.registered_overrides()["MRotaryEmbedding"]
    forward = rope._forward_method
    assert (
        forward.__func__ is rope_module.MRotaryEmbedding.forward_cuda and forward.__self__ is rope
    )
    assert "interleaved layout" in rope._layout_refused
    assert plugin.selector_for(rope, 4, 2) is None


def test_the_probe_rejects_a_forward_native_with_another_layout():
    """The registration's probe of forward_native: the installed one passes; one that reads the
    sections in the other layout, or cannot run on the probe's view of a layer, is refused."""
    native = rope_module.MRotaryEmbedding.forward_native
    assert mrope_native_reason(native) is None

    def swapped(layer, positions, query, key):
        layer.mrope_interleaved = not layer.mrope_interleaved
        return native(layer, positions, query, key)

    def foreign(layer, positions, query, key):
        return native(layer, positions, query, key, layer.offsets)

    assert "is not the mRoPE of" in mrope_native_reason(swapped)
    assert "cannot probe" in mrope_native_reason(foreign)


# -- outputs on the CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_override_matches_forward_native_per_layout(layout, is_neox):
    rope = make_rope(layout, is_neox=is_neox, dtype=torch.bfloat16)
    positions, query, key = make_inputs(rope, 7, 4, 2, torch.bfloat16, "cpu", "packed")
    check_against_native(rope, positions, query, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qk_layout", ["packed", "heads", "fused"])
@pytest.mark.parametrize("layout", ["chunked", "interleaved_partial"])
def test_override_matches_forward_native_matrix(dtype, qk_layout, layout):
    rope = make_rope(layout, dtype=dtype)
    positions, query, key = make_inputs(rope, 5, 6, 2, dtype, "cpu", qk_layout, seed=1)
    check_against_native(rope, positions, query, key)


@pytest.mark.parametrize("layout", ["chunked", "interleaved", "interleaved_yarn"])
def test_text_only_positions(layout):
    """``[T]`` positions (text only: the three streams equal) on the same layer."""
    rope = make_rope(layout, dtype=torch.float32)
    positions, query, key = make_inputs(rope, 9, 4, 2, torch.float32, "cpu", "packed", seed=2)
    check_against_native(rope, positions[1].contiguous(), query, key)
    # [3, T] with equal streams is the same rotation as [T].
    text = positions[1].contiguous()
    _, q3, k3 = make_inputs(rope, 9, 4, 2, torch.float32, "cpu", "packed", seed=3)
    q1, k1 = q3.clone(), k3.clone()
    rope(text.expand(3, -1), q3, k3)
    rope(text, q1, k1)
    torch.testing.assert_close(q3, q1, atol=0, rtol=0)
    torch.testing.assert_close(k3, k1, atol=0, rtol=0)


def test_positions_sliced_from_a_persistent_buffer():
    """vLLM's model runner passes ``mrope_positions[:, :T]`` of a ``[3, max_tokens]`` buffer."""
    rope = make_rope("interleaved", dtype=torch.float32)
    buffer, query, key = make_inputs(rope, 32, 4, 2, torch.float32, "cpu", "fused", seed=4)
    positions = buffer[:, :11]
    assert not positions.is_contiguous()
    check_against_native(rope, positions, query[:11], key[:11])


@pytest.mark.parametrize("num_tokens", [1, 13])
def test_override_without_key_rotates_only_the_query(num_tokens):
    rope = make_rope("interleaved", dtype=torch.float32)
    positions, query, _ = make_inputs(rope, num_tokens, 4, 4, torch.float32, "cpu", "packed")
    check_against_native(rope, positions, query, None)


def test_one_selector_per_spec_with_the_layers_sections():
    chunked = make_rope("chunked", dtype=torch.float32)
    yarn = make_rope("chunked_yarn", dtype=torch.float32)
    interleaved = make_rope("interleaved", dtype=torch.float32)
    for rope in (chunked, yarn, interleaved):
        positions, query, key = make_inputs(rope, 3, 4, 2, torch.float32, "cpu", "packed")
        rope(positions, query, key)
    selector = plugin.selector_for(chunked, 4, 2)
    assert isinstance(selector, RopeSelector)
    assert selector is plugin.selector_for(yarn, 4, 2)  # same spec: the cache differs, not it
    assert selector.spec.key == "q4_kv2_d64_r64_neox_float32_mrope8-12-12"
    assert plugin.selector_for(interleaved, 4, 2).spec.key.endswith("_mropei12-10-10")
    assert chunked._selector is selector and selector.explain(3).provider == "torch"


def test_a_layer_called_with_two_specs_runs_each_ones_selector():
    rope = make_rope("chunked", dtype=torch.float32)
    calls = [(4, 2, torch.float32, True), (8, 1, torch.float32, True), (4, 2, torch.bfloat16, True),
             (4, 2, torch.float32, False), (4, 2, torch.float32, True)]  # fmt: skip
    for num_heads, num_kv_heads, dtype, with_key in calls:
        positions, query, key = make_inputs(rope, 5, num_heads, num_kv_heads, dtype, "cpu", "heads")
        check_against_native(rope, positions, query, key if with_key else None)
    assert rope._specs_vary and rope._selector is None


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_a_spec_select_rope_refuses_runs_vllms_forward_native(is_neox):
    """float64 queries: no RopeSpec dtype, so the call runs vLLM's own forward_native math."""
    rope = make_rope("interleaved_yarn", is_neox=is_neox, dtype=torch.float32)
    positions, query, key = make_inputs(rope, 6, 4, 2, torch.float64, "cpu", "fused")
    native_q, native_k = rope.forward_native(positions, query.clone(), key.clone())
    rope(positions, query, key)
    torch.testing.assert_close(query, native_q, atol=0, rtol=0)
    torch.testing.assert_close(key, native_k, atol=0, rtol=0)
    assert plugin.selector_for(rope, 4, 2, dtype=torch.float64) is None
    _, query2, _ = make_inputs(rope, 6, 4, 2, torch.float64, "cpu", "packed", seed=5)
    native_q2, _ = rope.forward_native(positions, query2.clone(), torch.zeros_like(query2))
    rope(positions, query2, None)
    torch.testing.assert_close(query2, native_q2, atol=0, rtol=0)


def test_compiled_layer_keeps_one_graph_with_our_op():
    """Under torch.compile (fullgraph, as vLLM compiles) the override is one opaque op: no graph
    break, and the compiled outputs equal the eager ones."""
    rope = make_rope("interleaved_yarn", dtype=torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda p, q, k: rope(p, q, k), backend=backend, fullgraph=True)
    for num_tokens in (5, 9, 17):
        positions, query, key = make_inputs(rope, num_tokens, 4, 2, torch.float32, "cpu", "packed")
        eager_q, eager_k = query.clone(), key.clone()
        rope(positions, eager_q, eager_k)
        compiled(positions, query, key)
        torch.testing.assert_close(query, eager_q, atol=0, rtol=0)
        torch.testing.assert_close(key, eager_k, atol=0, rtol=0)
    assert 1 <= len(graphs) <= 2  # the first count, then one dynamic graph
    op = torch.ops.rope_autotune.vllm_mrotary_embedding
    for gm in graphs:
        targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
        assert op.default in targets or op in targets


# -- GPU: against vLLM's own CUDA path -----------------------------------------------------------


def _vllm_triton_or_skip():
    from kernels import get_provider

    reason = get_provider("vllm_mrope").unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"vLLM's mRoPE kernel: {reason}")


def qwen_layer(layout, is_neox=True, dtype=torch.bfloat16):
    """Qwen2.5-VL-7B's (chunked [16, 24, 24]) or Qwen3-VL-8B's (interleaved [24, 20, 20]) layer,
    head 128, on the GPU."""
    params = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    if layout == "interleaved":
        params = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                  "mrope_interleaved": True}  # fmt: skip
    with vllm_config(["all"]):
        return rope_module.get_rope(128, 4096, is_neox, params, dtype).to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["chunked", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 16, 257])
def test_override_matches_vllm_forward_cuda_gpu(layout, dtype, num_tokens):
    """[3, T] positions: vLLM's gather and Triton kernel (its text-only path needs vLLM's
    flash-attention rotary, not on the test machine)."""
    _vllm_triton_or_skip()
    rope = qwen_layer(layout, dtype=dtype)
    positions, query, key = make_inputs(rope, num_tokens, 28, 4, dtype, "cuda", "packed")
    vllm_q, vllm_k = rope_module.MRotaryEmbedding.forward_cuda(
        rope, positions, query.clone(), key.clone()
    )
    rope(positions, query, key)
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = 2 * atol, 2 * rtol  # vLLM's kernel computes in the element type, ours in fp32
    torch.testing.assert_close(query, vllm_q.view(query.shape), atol=atol, rtol=rtol)
    torch.testing.assert_close(key, vllm_k.view(key.shape), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["chunked", "interleaved"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("text_only", [False, True], ids=["thw", "text"])
def test_override_matches_forward_native_gpu(layout, is_neox, text_only):
    rope = qwen_layer(layout, is_neox=is_neox)
    positions, query, key = make_inputs(rope, 64, 28, 4, torch.bfloat16, "cuda", "fused")
    check_against_native(rope, positions[0].contiguous() if text_only else positions, query, key)


@pytest.mark.gpu
@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no_key"])
def test_override_under_cuda_graph_capture_gpu(with_key):
    rope = qwen_layer("interleaved")
    positions, query, key = make_inputs(rope, 64, 32, 8, torch.bfloat16, "cuda", "packed")
    key = key if with_key else None
    rope(positions, query.clone(), None if key is None else key.clone())  # warm-up, off capture
    static_q, static_k = query.clone(), None if key is None else key.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope(positions, static_q, static_k)
    for seed in (3, 4):
        new_pos, new_q, new_k = make_inputs(rope, 64, 32, 8, torch.bfloat16, "cuda", "packed", seed)
        positions.copy_(new_pos)
        static_q.copy_(new_q)
        if key is not None:
            static_k.copy_(new_k)
        graph.replay()
        eager_k = None if key is None else new_k.clone()
        rope(positions, new_q, eager_k)
        torch.testing.assert_close(static_q, new_q, atol=0, rtol=0)
        if key is not None:
            torch.testing.assert_close(static_k, eager_k, atol=0, rtol=0)
