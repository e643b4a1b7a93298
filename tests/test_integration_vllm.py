"""The vLLM plugin against vLLM's real RoPE layers (vLLM 0.26.0's Python layers; skipped without).

On the CPU vLLM finds no platform, so with the custom op on a layer's ``forward`` is its
``forward_cuda``: the override, running the ``torch`` provider. On a GPU the override is checked
against vLLM's own CUDA op, eagerly and under CUDA graph capture.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch

rope_module = pytest.importorskip("vllm.model_executor.layers.rotary_embedding")
from conftest import ROOT, vllm_config, vllm_qk  # noqa: E402
from vllm.model_executor.custom_op import op_registry_oot  # noqa: E402

from kernels import RopeSelector, get_provider  # noqa: E402
from kernels.integrations import vllm as plugin  # noqa: E402
from kernels.testing import TOLERANCES, assert_rope_close, rope_reference  # noqa: E402

MAX_POSITION = 512
# No tuning table for the CPU: select_rope warns once per spec and runs the torch provider.
pytestmark = [
    pytest.mark.filterwarnings("ignore::kernels.RopeTableWarning"),
    pytest.mark.usefixtures("vllm_plugin", "fresh_rope_layers"),
]

# rope_parameters for get_rope -> the class it builds, one per covered class.
COVERED = {
    "RotaryEmbedding": {"rope_type": "default", "rope_theta": 10000.0},
    "LinearScalingRotaryEmbedding": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "NTKScalingRotaryEmbedding": {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 2.0},
    "DynamicNTKScalingRotaryEmbedding": {"rope_type": "dynamic", "factor": 2.0},
    "DynamicNTKAlphaRotaryEmbedding": {"rope_type": "dynamic", "alpha": 2.0},
    "Llama3RotaryEmbedding": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "YaRNScalingRotaryEmbedding": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "TeleChat3RoPEScaledRotaryEmbedding": {
        "rope_type": "telechat3-yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "Gemma4RotaryEmbedding": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
}
# Classes whose kernel is neither the base op nor mRoPE: get_rope must keep returning vLLM's own
# (the multimodal ones are in test_integration_vllm_mrope.py).
NOT_COVERED = {
    "DeepseekScalingRotaryEmbedding": {
        "rope_type": "deepseek_yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "XDRotaryEmbedding": {"rope_type": "xdrope", "alpha": 2.0, "xdrope_section": [8, 8, 8, 8]},
}


def make_rope(params, head_size=64, is_neox=True, dtype=torch.bfloat16, custom_ops=("all",)):
    with vllm_config(list(custom_ops)):
        return rope_module.get_rope(head_size, MAX_POSITION, is_neox, dict(params), dtype)


def make_inputs(num_tokens, num_heads, num_kv_heads, head_size, dtype, device, layout, seed=0):
    """positions, query, key as vLLM passes them (``layout``: :func:`conftest.vllm_qk`)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    query, key = vllm_qk(num_tokens, num_heads, num_kv_heads, head_size, dtype, device, layout, gen)
    return positions, query, key


def check_against_native(rope, positions, query, key):
    """Run the overridden layer in place and compare it with vLLM's forward_native and with a
    float64 reference on the layer's own cache."""
    dtype = query.dtype
    native_q, native_k = rope.forward_native(
        positions, query.clone(), None if key is None else key.clone()
    )
    cache = rope.cos_sin_cache  # converted to the query's dtype by forward_native, as vLLM does
    expected_q, expected_k = rope_reference(
        positions, query, key, cache, rope.head_size, rope.is_neox_style
    )
    out_q, out_k = rope(positions, query, key)
    assert out_q is query and out_k is key  # in place, vLLM's return convention
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(query, native_q.view(query.shape), atol=atol, rtol=rtol)
    assert_rope_close(query, expected_q, dtype, "query")
    if key is not None:
        torch.testing.assert_close(key, native_k.view(key.shape), atol=atol, rtol=rtol)
        assert_rope_close(key, expected_k, dtype, "key")


# -- registration --------------------------------------------------------------------------------


def test_pyproject_declares_the_entry_point():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["rope_autotune"]
    module, _, attr = target.partition(":")
    assert (module, attr) == ("kernels.integrations.vllm", "register")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels.integrations" in setuptools["packages"]


def test_covered_classes_are_exactly_the_classes_the_rules_accept():
    # Every RoPE class in vLLM's package is either covered (runs RotaryEmbedding's own CUDA and
    # native paths and cache conversion, or MRotaryEmbedding's) or left to vLLM; the rules and
    # the lists agree.
    classes = {
        name: obj
        for name in dir(rope_module)
        if isinstance(obj := getattr(rope_module, name), type) and "RotaryEmbedding" in name
    }
    base, mrope = rope_module.RotaryEmbedding, rope_module.MRotaryEmbedding
    follows_base = {n for n, c in classes.items() if plugin._base_path_reason(c, base) is None}
    follows_mrope = {n for n, c in classes.items() if plugin._mrope_path_reason(c, mrope) is None}
    assert follows_base == set(plugin.BASE_OP_CLASSES)
    assert follows_mrope == set(plugin.MROPE_CLASSES)
    assert set(plugin.COVERED_CLASSES) == follows_base | follows_mrope
    assert set(plugin.registered_overrides()) == set(plugin.COVERED_CLASSES)


def test_register_is_idempotent_and_unregister_restores_vllm():
    plugin.register()  # a second call (vLLM may load plugins more than once) changes nothing
    overrides = plugin.registered_overrides()
    assert all(op_registry_oot[name] is cls for name, cls in overrides.items())
    plugin.unregister()
    try:
        assert not any(name in op_registry_oot for name in plugin.COVERED_CLASSES)
        rope = make_rope(COVERED["RotaryEmbedding"])
        assert type(rope) is rope_module.RotaryEmbedding
    finally:
        plugin.register()


@pytest.mark.parametrize("name", sorted(COVERED))
def test_get_rope_returns_the_override(name):
    rope = make_rope(COVERED[name])
    in_tree = getattr(rope_module, name)
    assert isinstance(rope, in_tree)
    assert type(rope) is plugin.registered_overrides()[name]
    assert type(rope).name == "rotary_embedding"  # the switch users know, not the class name


@pytest.mark.parametrize("name", sorted(NOT_COVERED))
def test_other_rope_classes_stay_vllms(name):
    rope = make_rope(NOT_COVERED[name])
    assert type(rope) is getattr(rope_module, name)


@pytest.mark.parametrize("on_by_default", [True, False])
@pytest.mark.parametrize(
    ("custom_ops", "runs_override"),
    [
        (("all",), True),
        (("none", "+rotary_embedding"), True),
        (("none",), "on_by_default"),  # vLLM's default under Inductor
        (("all", "-rotary_embedding"), False),
        (("none", "-rotary_embedding"), False),
    ],
)
def test_the_rotary_embedding_switch_turns_the_override_on_and_off(
    monkeypatch, on_by_default, custom_ops, runs_override
):
    monkeypatch.setattr(plugin, "ON_BY_DEFAULT", on_by_default)
    if runs_override == "on_by_default":
        runs_override = on_by_default
    for name in ("Llama3RotaryEmbedding", "RotaryEmbedding"):
        rope = make_rope(COVERED[name], custom_ops=custom_ops)
        forward = rope._forward_method.__func__
        assert (forward is plugin._SelectedRope.forward_cuda) == runs_override, name
    if not runs_override:  # vLLM's path with the op off: its forward_native
        assert forward is rope_module.RotaryEmbedding.forward_native


@pytest.mark.parametrize("on_by_default", [True, False])
def test_vllms_default_config_runs_the_override_when_on_by_default(monkeypatch, on_by_default):
    """A VllmConfig with nothing set: vLLM compiles (mode VLLM_COMPILE) with custom_ops
    "none", where the override runs only because of ON_BY_DEFAULT."""
    monkeypatch.setattr(plugin, "ON_BY_DEFAULT", on_by_default)
    with vllm_config() as config:
        assert config.compilation_config.custom_ops == ["none"]
        params = dict(COVERED["RotaryEmbedding"])
        rope = rope_module.get_rope(64, MAX_POSITION, True, params, torch.bfloat16)
    forward = rope._forward_method.__func__
    expected = plugin._SelectedRope.forward_cuda if on_by_default else None
    assert forward is (expected or rope_module.RotaryEmbedding.forward_native)


def test_the_log_says_whether_the_op_is_on_and_why(monkeypatch, caplog):
    monkeypatch.setattr(plugin, "_LOGGED", set())
    monkeypatch.setattr(plugin, "ON_BY_DEFAULT", True)
    with caplog.at_level(logging.INFO, logger="vllm.rope_autotune"):
        make_rope(COVERED["RotaryEmbedding"], custom_ops=("none",))
        make_rope(COVERED["RotaryEmbedding"], head_size=32, custom_ops=("none",))  # logged once
        make_rope(
            COVERED["RotaryEmbedding"], head_size=16, custom_ops=("none", "-rotary_embedding")
        )
    lines = [r.getMessage() for r in caplog.records if "custom op" in r.getMessage()]
    assert lines == [
        "rope-autotune: custom op 'rotary_embedding' on for RotaryEmbedding: "
        "rope-autotune turns it on by default",
        "rope-autotune: custom op 'rotary_embedding' off for RotaryEmbedding: "
        "custom_ops has -rotary_embedding",
    ]


@pytest.mark.parametrize("fusion", plugin.FUSION_PASSES)
def test_a_fusion_pass_on_keeps_vllms_own_op(fusion):
    """vLLM turns the custom op on for these passes, which match its own op: the layer keeps it."""
    with vllm_config(["none", "+rotary_embedding"], fusion_passes=(fusion,)):
        rope = rope_module.get_rope(64, MAX_POSITION, True, dict(COVERED["RotaryEmbedding"]))
    assert type(rope) is plugin.registered_overrides()["RotaryEmbedding"]
    forward = rope._forward_method
    assert forward.__func__ is rope_module.RotaryEmbedding.forward_cuda and forward.__self__ is rope


@pytest.mark.slow
def test_vllm_loads_the_plugin_through_its_entry_point(tmp_path):
    """vLLM's own load_general_plugins, in a fresh process, finds the entry point pyproject.toml
    declares (a dist-info holding it is put on the path) and honours VLLM_PLUGINS."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["rope_autotune"]
    dist = tmp_path / "rope_autotune_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rope-autotune-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[vllm.general_plugins]\nrope_autotune = {target}\n")
    code = (
        "import torch\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.custom_op import op_registry_oot\n"
        "print(sorted(n for n, c in op_registry_oot.items()"
        " if c.__module__ == 'kernels.integrations.vllm'))\n"
    )
    results = {}
    for allowed in ("rope_autotune", "some_other_plugin"):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
            VLLM_PLUGINS=allowed,
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[allowed] = proc.stdout.strip().splitlines()[-1]
    assert results["rope_autotune"] == str(sorted(plugin.COVERED_CLASSES))
    assert results["some_other_plugin"] == "[]"


# -- outputs on the CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COVERED))
def test_override_matches_forward_native_per_rope_type(name):
    rope = make_rope(COVERED[name], head_size=64, dtype=torch.bfloat16)
    positions, query, key = make_inputs(7, 4, 2, 64, torch.bfloat16, "cpu", "packed")
    check_against_native(rope, positions, query, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("layout", ["packed", "heads", "fused"])
def test_override_matches_forward_native_matrix(dtype, is_neox, partial, layout):
    params = dict(COVERED["RotaryEmbedding"], partial_rotary_factor=0.25 if partial else 1.0)
    rope = make_rope(params, head_size=64, is_neox=is_neox, dtype=dtype)
    assert rope.rotary_dim == (16 if partial else 64)
    positions, query, key = make_inputs(5, 6, 2, 64, dtype, "cpu", layout, seed=1)
    check_against_native(rope, positions, query, key)


@pytest.mark.parametrize("num_tokens", [1, 13])
def test_override_without_key_rotates_only_the_query(num_tokens):
    rope = make_rope(COVERED["Llama3RotaryEmbedding"], dtype=torch.float32)
    positions, query, _ = make_inputs(num_tokens, 4, 4, 64, torch.float32, "cpu", "packed", seed=2)
    check_against_native(rope, positions, query, None)


def test_one_selector_per_spec_shared_by_layers():
    first = make_rope(COVERED["RotaryEmbedding"], dtype=torch.float32)
    second = make_rope(COVERED["YaRNScalingRotaryEmbedding"], dtype=torch.float32)
    for rope in (first, second):
        positions, query, key = make_inputs(3, 4, 2, 64, torch.float32, "cpu", "packed")
        rope(positions, query, key)
    selector = plugin.selector_for(first, 4, 2)
    assert isinstance(selector, RopeSelector)
    assert selector is plugin.selector_for(second, 4, 2)
    assert selector.spec.key == "q4_kv2_d64_r64_neox_float32"
    assert selector.explain(3).provider == "torch"


@pytest.mark.parametrize("layout", ["packed", "heads"])
def test_a_layer_called_with_two_specs_runs_each_ones_selector(layout):
    """vLLM shares one layer between attention layers with the same rotary parameters; calls
    with other heads, a dtype or no key must not run the last call's selector."""
    rope = make_rope(COVERED["RotaryEmbedding"], dtype=torch.float32)
    calls = [(4, 2, torch.float32, True), (8, 1, torch.float32, True), (4, 2, torch.bfloat16, True),
             (4, 2, torch.float32, False), (4, 2, torch.float32, True)]  # fmt: skip
    for num_heads, num_kv_heads, dtype, with_key in calls:
        positions, query, key = make_inputs(5, num_heads, num_kv_heads, 64, dtype, "cpu", layout)
        check_against_native(rope, positions, query, key if with_key else None)
    assert rope._specs_vary and rope._selector is None


def test_a_layer_with_one_spec_keeps_its_selector():
    rope = make_rope(COVERED["RotaryEmbedding"], dtype=torch.float32)
    for seed in range(3):
        positions, query, key = make_inputs(7, 4, 2, 64, torch.float32, "cpu", "fused", seed=seed)
        check_against_native(rope, positions, query, key)
    assert rope._selector is plugin.selector_for(rope, 4, 2) and not rope._specs_vary


def test_compiled_layer_keeps_one_graph_with_our_op():
    """Under torch.compile (fullgraph, as vLLM compiles) the override is one opaque op: no graph
    break, and the compiled outputs equal the eager ones."""
    rope = make_rope(COVERED["Llama3RotaryEmbedding"], dtype=torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda p, q, k: rope(p, q, k), backend=backend, fullgraph=True)
    for num_tokens in (5, 9, 17):
        positions, query, key = make_inputs(num_tokens, 4, 2, 64, torch.float32, "cpu", "packed")
        eager_q, eager_k = query.clone(), key.clone()
        rope(positions, eager_q, eager_k)
        compiled(positions, query, key)
        torch.testing.assert_close(query, eager_q, atol=0, rtol=0)
        torch.testing.assert_close(key, eager_k, atol=0, rtol=0)
    assert 1 <= len(graphs) <= 2  # the first count, then one dynamic graph
    for gm in graphs:
        targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
        assert torch.ops.rope_autotune.vllm_rotary_embedding.default in targets or (
            torch.ops.rope_autotune.vllm_rotary_embedding in targets
        )


# -- GPU: against vLLM's own CUDA op -------------------------------------------------------------


def _vllm_op_or_skip(device):
    reason = get_provider("vllm").unavailable_reason(device)  # loads vLLM's op library
    if reason is not None:
        pytest.skip(f"vLLM's CUDA op: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(COVERED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 16, 257])
def test_override_matches_vllm_forward_cuda_gpu(name, dtype, num_tokens):
    _vllm_op_or_skip("cuda")
    rope = make_rope(COVERED[name], head_size=128, dtype=dtype).to("cuda")
    positions, query, key = make_inputs(num_tokens, 32, 8, 128, dtype, "cuda", "fused")
    vllm_q, vllm_k = query.clone(), key.clone()
    getattr(rope_module, name).forward_cuda(rope, positions, vllm_q, vllm_k)  # vLLM's own path
    rope(positions, query, key)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(query, vllm_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(key, vllm_k, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("with_key", [True, False], ids=["key", "no_key"])
def test_override_under_cuda_graph_capture_gpu(with_key):
    _vllm_op_or_skip("cuda")
    rope = make_rope(COVERED["Llama3RotaryEmbedding"], head_size=128).to("cuda")
    positions, query, key = make_inputs(64, 32, 8, 128, torch.bfloat16, "cuda", "packed")
    key = key if with_key else None
    rope(positions, query.clone(), None if key is None else key.clone())  # warm-up, off capture
    static_q, static_k = query.clone(), None if key is None else key.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope(positions, static_q, static_k)
    for seed in (3, 4):
        new_pos, new_q, new_k = make_inputs(64, 32, 8, 128, torch.bfloat16, "cuda", "packed", seed)
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
