"""Every provider against the float64 oracle of ``_reference64``, over the contract's matrix.

CPU: ``torch`` and ``triton`` (under ``TRITON_INTERPRET=1``) on the whole matrix,
``torch_compile`` on a few cases (a compile costs seconds on the CPU), and its recompile budget
under ``-m slow``.
GPU (``-m gpu``): all five providers on the same matrix plus large token counts.
"""

from __future__ import annotations

import pytest
import torch
from _reference64 import Case, build_inputs, check_outputs, covering_matrix, seed_of, with_
from conftest import case_spec

from kernels import (
    RopeSpec,
    get_provider,
    list_providers,
    provider_names,
    register_provider,
    unregister_provider,
)
from kernels._cast_once import CastOnce
from kernels.providers._torch_compile import TorchCompileProvider
from kernels.providers._triton import PARAM_SPACE, config_problems, default_triton_config
from kernels.providers._triton_launch import TritonLauncher

MATRIX = covering_matrix()
# A few cases for torch.compile on the CPU: both styles, key present and absent, three dtypes,
# a fused-qkv slice, [B, S] inputs, a padded view.
COMPILE_CASES = [MATRIX[i] for i in (3, 10, 13, 35)]
# Providers that do their arithmetic in the element type rather than float32 (vLLM's op
# multiplies and subtracts in scalar_t): extra error allowed, in epsilons of the terms' size.
ARITH_ULPS = {"vllm": 2.0}
NAMES = ("torch", "torch_compile", "triton", "flashinfer", "vllm")
# The multimodal-only providers (tests/test_mrope.py checks them).
MROPE_NAMES = ("triton_mrope", "vllm_mrope")


def _run(name: str, case: Case, seed: int, device: str = "cpu", config=None):
    """Build ``case``'s inputs on ``device``, run provider ``name`` on them, return the inputs."""
    provider = get_provider(name)
    inputs = build_inputs(case, seed, device)
    provider.apply(
        inputs.positions,
        inputs.query,
        inputs.key,
        inputs.cos_sin_cache,
        head_size=case.head_size,
        is_neox=case.is_neox,
        config=config,
    )
    return inputs


def _check_exact(inputs) -> None:
    """With the ``exact`` cache every output is an input, possibly negated: demand the exact
    bits, and that nearly every rotated element changed (so a skipped one would show)."""
    for name, buffer in inputs.buffers.items():
        mask = inputs.rotated[name]
        got = buffer.cpu()[mask].double()
        want = inputs.expected[name][mask]
        before = inputs.before[name][mask].double()
        assert (want != before).double().mean() > 0.99, "inputs do not exercise every element"
        wrong = got != want
        assert not bool(wrong.any()), (
            f"{name}: {int(wrong.sum())} of {wrong.numel()} rotated elements wrong "
            f"(first at {mask.nonzero()[int(wrong.nonzero()[0])].tolist()})"
        )
    check_outputs(inputs, next(iter(inputs.buffers.values())).dtype)


# -- CPU: the matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_provider_matrix_cpu(name, case, request):
    inputs = _run(name, case, seed_of(request.node.nodeid))
    check_outputs(inputs, case.dtype)
    if case.cache_kind == "exact":
        _check_exact(inputs)


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.id)
def test_torch_compile_cpu(case, request):
    seed = seed_of(request.node.nodeid)
    check_outputs(_run("torch_compile", case, seed), case.dtype)
    # The compiled function is reused for a new token count, and stays right.
    check_outputs(_run("torch_compile", with_(case, num_tokens=20), seed + 1), case.dtype)


@pytest.mark.slow
def test_torch_compile_recompiles_at_most_twice_over_20_token_counts(request):
    """The issue's budget: 20 calls, 20 token counts, at most two recompiles (three graphs)."""
    from torch._dynamo.utils import counters

    provider = TorchCompileProvider()  # its own compiled function: nothing compiled yet
    case = Case(head_size=64, rotary_dim=64, num_heads=4, num_kv_heads=2, layout="qkv")
    counts = [1, 2, 3, 5, 7, 8, 13, 16, 31, 33, 64, 65, 100, 127, 128, 200, 255, 256, 300, 511]
    assert len(set(counts)) == 20
    counters.clear()
    seed = seed_of(request.node.nodeid)
    for i, num_tokens in enumerate(counts):
        inputs = build_inputs(with_(case, num_tokens=num_tokens), seed + i)
        provider.apply(
            inputs.positions,
            inputs.query,
            inputs.key,
            inputs.cos_sin_cache,
            head_size=case.head_size,
            is_neox=case.is_neox,
        )
        check_outputs(inputs, case.dtype)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "nothing was compiled: the counter does not see this provider"
    assert graphs <= 3, f"{graphs} graphs compiled for 20 token counts (at most 1 + 2 recompiles)"


@pytest.mark.parametrize(
    "case",
    [
        Case(cache_kind="exact", layout="padded", dtype=torch.float16),
        Case(cache_kind="exact", layout="qkv", is_neox=False, head_size=96, rotary_dim=24),
        Case(cache_kind="exact", layout="bs_heads", num_kv_heads=None, dtype=torch.float32),
    ],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_every_rotated_element_written_cpu(name, case, request):
    _check_exact(_run(name, with_(case, num_tokens=33), seed_of(request.node.nodeid)))


# Triton: more tokens than one token block, head counts that block_h does not divide, and head
# blocks spread over programs, under explicit configs from the parameter space.
TRITON_CONFIGS = [
    {"block_t": 1, "block_h": 1, "head_split": 1, "num_warps": 1, "num_stages": 1},
    {"block_t": 4, "block_h": 8, "head_split": 2, "num_warps": 2, "num_stages": 1},
    {"block_t": 16, "block_h": 4, "head_split": 2, "num_warps": 4, "num_stages": 2},
    {"block_t": 8, "block_h": 16, "head_split": 1, "num_warps": 8, "num_stages": 1},
    {"block_t": 2, "block_h": 2, "head_split": 4, "num_warps": 4, "num_stages": 3},
    # Key head blocks continue the query's numbering: 12 query blocks over 8 programs put the
    # first key block on program 4; with 3 query blocks over 4 the one key block on program 3.
    {"block_t": 2, "block_h": 1, "head_split": 8, "num_warps": 1, "num_stages": 1},
    {"block_t": 1, "block_h": 4, "head_split": 4, "num_warps": 2, "num_stages": 1},
    # More programs asked for than there are head blocks (15 or 16; 12 without a key): the
    # launcher starts one per block.
    {"block_t": 2, "block_h": 1, "head_split": 16, "num_warps": 1, "num_stages": 1},
]
TRITON_MASK_CASES = [
    with_(case, num_tokens=37, cache_kind="exact")
    for case in (
        Case(head_size=128, rotary_dim=64, num_heads=12, num_kv_heads=4, layout="qkv"),
        Case(
            head_size=96,
            rotary_dim=24,
            num_heads=12,
            num_kv_heads=3,
            is_neox=False,
            layout="padded",
        ),
        Case(head_size=80, rotary_dim=80, num_heads=12, num_kv_heads=None, layout="bs_flat"),
    )
]


def _config_id(config: dict) -> str:
    return "_".join(f"{name}{value}" for name, value in config.items())


@pytest.mark.parametrize("case", TRITON_MASK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=_config_id)
def test_triton_configs_mask_tokens_and_heads(config, case, request):
    spec = case_spec(case)
    assert config_problems(spec, config) == []
    _check_exact(_run("triton", case, seed_of(request.node.nodeid), config=config))


@pytest.mark.parametrize("num_tokens", [None, 1, 7, 63, 300, 1023, 1024, 4095, 4096, 100_000])
@pytest.mark.parametrize("case", MATRIX[::3], ids=lambda c: c.id)
def test_triton_default_config_is_valid(case, num_tokens):
    spec = case_spec(case)
    config = default_triton_config(spec, num_tokens)
    assert set(config) == set(PARAM_SPACE)
    assert all(config[name] in PARAM_SPACE[name] for name in config), config
    assert config_problems(spec, config) == []
    assert get_provider("triton").check_config(spec, None) == default_triton_config(spec)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_zero_tokens_write_nothing_and_are_still_checked(name):
    """Zero-token views into the middle of fused qkv buffers ([T] and [B, S] positions): the
    call returns and every buffer, the cache included, keeps its bits; a call that breaks the
    contract is refused even without tokens."""
    provider = get_provider(name)
    cache = torch.randn(16, 64)
    for shape in ((5,), (2, 5)):
        qkv = torch.randn(*shape, (4 + 2) * 64)
        rows = qkv[..., 2:2, :]  # no tokens, at a nonzero offset into the buffer
        q, k = rows[..., : 4 * 64], rows[..., 4 * 64 :]
        positions = torch.zeros(rows.shape[:-1], dtype=torch.long)
        saved = qkv.clone(), cache.clone()
        for key in (k, None):
            provider.apply(positions, q, key, cache, head_size=64, is_neox=True)
        assert q.numel() == 0 and q.storage_offset() > 0
        assert torch.equal(qkv, saved[0]) and torch.equal(cache, saved[1])
        with pytest.raises(TypeError, match="query"):
            provider.apply(positions, q.double(), k, cache, head_size=64, is_neox=True)
        three_heads = rows[..., 64 : 4 * 64]
        with pytest.raises(ValueError, match="key: expected a head count dividing"):
            provider.apply(positions, q, three_heads, cache, head_size=64, is_neox=True)


# -- registry --------------------------------------------------------------------------------


def test_registry_has_exactly_the_builtin_providers():
    assert sorted(provider_names()) == sorted(NAMES + MROPE_NAMES)
    for name in NAMES + MROPE_NAMES:
        assert get_provider(name).name == name


def test_register_and_unregister_a_provider():
    twin = TorchCompileProvider(name="test_twin")
    assert register_provider(twin) is twin and get_provider("test_twin") is twin
    assert provider_names()[-1] == "test_twin"
    assert unregister_provider("test_twin") is twin
    assert "test_twin" not in provider_names()
    with pytest.raises(KeyError, match="test_twin"):
        unregister_provider("test_twin")


def test_get_provider_unknown_name_lists_the_registered():
    with pytest.raises(KeyError) as info:
        get_provider("nope")
    message = str(info.value)
    assert "nope" in message
    assert all(name in message for name in NAMES)


def test_list_providers_cpu_gives_availability_and_reasons():
    statuses = {s.name: s for s in list_providers("cpu")}
    assert set(statuses) == set(NAMES + MROPE_NAMES)
    for name in ("torch", "torch_compile", "triton", "triton_mrope"):  # triton: interpreted
        assert statuses[name].available and statuses[name].reason is None, statuses[name]
    for name in ("flashinfer", "vllm", "vllm_mrope"):
        assert not statuses[name].available
        assert isinstance(statuses[name].reason, str) and "CUDA" in statuses[name].reason


def test_list_providers_names_why_triton_cannot_run_on_meta():
    status = {s.name: s for s in list_providers("meta")}["triton"]
    assert not status.available and "meta" in status.reason


def test_param_spaces():
    assert dict(get_provider("triton").param_space) == PARAM_SPACE
    for name in ("torch", "torch_compile", "flashinfer", "vllm"):
        provider = get_provider(name)
        assert dict(provider.param_space) == {}
        assert provider.default_config(case_spec(MATRIX[0])) == {}


def test_flashinfer_declares_its_limits():
    flashinfer = get_provider("flashinfer")
    spec = case_spec(Case(dtype=torch.bfloat16))
    assert flashinfer.unsupported_reason(spec) is None
    assert flashinfer.unsupported_reason(case_spec(Case(dtype=torch.float16))) is None
    assert "float32" in flashinfer.unsupported_reason(case_spec(Case(dtype=torch.float32)))
    assert "key" in flashinfer.unsupported_reason(spec, has_key=False)
    for name in ("torch", "torch_compile", "triton"):
        provider = get_provider(name)
        for case in MATRIX:
            assert provider.unsupported_reason(case_spec(case), has_key=False) is None


def test_cast_once_converts_a_cache_once_and_again_after_an_update():
    cast = CastOnce(torch.float32)
    cache = torch.randn(32, 16, dtype=torch.bfloat16)
    first = cast(cache)
    assert first.dtype == torch.float32 and torch.equal(first, cache.float())
    assert cast(cache) is first and cast.conversions == 1
    cache.mul_(2)  # an in-place update must not serve the stale copy
    second = cast(cache)
    assert second is not first and torch.equal(second, cache.float())
    assert cast.conversions == 2
    already = torch.randn(4, 4)
    assert cast(already) is already and cast.conversions == 2


# -- GPU: all five providers -----------------------------------------------------------------

GPU_MATRIX = [
    *MATRIX,
    Case(num_tokens=4097, layout="qkv", head_size=128, rotary_dim=128, num_heads=8, num_kv_heads=2),
    Case(num_tokens=1000, layout="bs_padded", is_neox=False, dtype=torch.float16, num_heads=16),
    Case(num_tokens=2049, layout="qkv", head_size=64, rotary_dim=32, num_kv_heads=None),
    Case(num_tokens=513, layout="heads", dtype=torch.float32, cache_kind="rope", near_max=True),
]


def _skip_unless_runs(name: str, case: Case) -> None:
    provider = get_provider(name)
    reason = provider.unavailable_reason("cuda")
    if reason is None:
        reason = provider.unsupported_reason(case_spec(case), has_key=case.num_kv_heads is not None)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


class _FakeOpPacket:
    """Stands in for ``torch.ops._C.rotary_embedding``: the overload records its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.default = lambda *args: self.calls.append(args)

    def __call__(self, *args):
        raise AssertionError("the packet resolves its overload per call: call .default")


@pytest.mark.parametrize(
    "layout", ["vllm", "int32 positions", "batch [B, S]", "heads [T, H, D]", "no key"]
)
def test_vllm_gets_its_own_layout_untouched_and_others_as_token_head_views(layout, monkeypatch):
    import kernels.providers._vllm as vllm_provider

    op = _FakeOpPacket()
    monkeypatch.setattr(vllm_provider, "load_vllm_rotary_op", lambda: op)
    spec = RopeSpec(64, 64, 4, 2, True, torch.float16)
    fn = get_provider("vllm").build(spec, {})
    qkv = torch.randn(6, (4 + 2 * 2) * 64, dtype=torch.float16)
    query, key = qkv[:, : 4 * 64], qkv[:, 4 * 64 : 6 * 64]
    positions = torch.arange(6)
    cache = torch.randn(16, 64)
    if layout == "int32 positions":
        positions = positions.int()
    elif layout == "batch [B, S]":
        positions, query, key = positions.view(2, 3), query.view(2, 3, -1), key.view(2, 3, -1)
    elif layout == "heads [T, H, D]":
        query, key = query.view(6, 4, 64), key.view(6, 2, 64)
    elif layout == "no key":
        key = None
    fn(positions, query, key, cache)

    ((pos, q, k, head_size, cos_sin, is_neox),) = op.calls
    assert (head_size, cos_sin, is_neox) == (64, cache, True)
    if layout in ("vllm", "no key"):
        assert pos is positions and q is query and k is key  # no view, no copy
        return
    assert pos.dtype == torch.int64 and pos.shape == (6,) and pos.tolist() == list(range(6))
    for view, heads, source in ((q, 4, qkv[:, : 4 * 64]), (k, 2, qkv[:, 4 * 64 : 6 * 64])):
        assert view.shape == (6, heads, 64) and view.data_ptr() == source.data_ptr()
        assert view.stride() == (qkv.stride(0), 64, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_MATRIX, ids=lambda c: c.id)
@pytest.mark.parametrize("name", NAMES)
def test_provider_matrix_gpu(name, case, request):
    if name == "torch_compile" and GPU_MATRIX.index(case) % 3:
        pytest.skip("torch_compile: every third case (a compile per spec costs seconds)")
    _skip_unless_runs(name, case)
    inputs = _run(name, case, seed_of(request.node.nodeid), device="cuda")
    torch.cuda.synchronize()
    check_outputs(inputs, case.dtype, ARITH_ULPS.get(name, 0.0))
    if case.cache_kind == "exact":
        _check_exact(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TRITON_MASK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=_config_id)
def test_triton_configs_gpu(config, case, request):
    case = with_(case, num_tokens=1037, cache_kind="exact")
    _check_exact(_run("triton", case, seed_of(request.node.nodeid), "cuda", config=config))


@pytest.mark.gpu
def test_flashinfer_converts_a_bf16_cache_once():
    _skip_unless_runs("flashinfer", Case())
    flashinfer = get_provider("flashinfer")
    case = Case(dtype=torch.bfloat16, cache_dtype="same", num_tokens=64)
    inputs = build_inputs(case, 0, "cuda")
    before = flashinfer._to_float32.conversions
    for _ in range(3):
        flashinfer.apply(
            inputs.positions,
            inputs.query.clone(),
            inputs.key.clone(),
            inputs.cos_sin_cache,
            head_size=case.head_size,
            is_neox=case.is_neox,
        )
    assert flashinfer._to_float32.conversions == before + 1


@pytest.mark.parametrize("num_heads", [1, 3, 6, 28, 32, 48, 64, 96, 128])
@pytest.mark.parametrize("rotary_dim", [16, 24, 32, 64, 128, 256])
@pytest.mark.parametrize("num_tokens", [None, 1, 255, 256, 1000, 2048, 65536])
def test_triton_default_config_valid_for_any_head_count(num_heads, rotary_dim, num_tokens):
    # Regression: 48 heads once gave block_h=64, outside the declared space, so the selector's
    # fallback rejected its own default.
    spec = RopeSpec(256, rotary_dim, num_heads, 1, True, torch.bfloat16)
    provider = get_provider("triton")
    config = provider.default_config(spec, num_tokens)
    assert provider.check_config(spec, config) == config


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(8, 1), (32, 8), (28, 4), (16, 8), (64, 64)]
)
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1023, 1024, 4095])
def test_triton_default_spreads_heads_over_programs_when_tokens_are_few(
    num_heads, num_kv_heads, num_tokens
):
    # Latency-bound calls: each program gets one or two head blocks (never a whole token's
    # heads), so a decode step fills the GPU. Large calls stream whole tokens instead.
    spec = RopeSpec(128, 128, num_heads, num_kv_heads, True, torch.bfloat16)
    config = default_triton_config(spec, num_tokens)
    blocks = -(-num_heads // config["block_h"]) + -(-num_kv_heads // config["block_h"])
    assert config["head_split"] >= blocks  # one head block per program: one memory round trip
    assert TritonLauncher(spec, config).grid(num_tokens, True)[1] == blocks  # none idle
    assert config["block_h"] <= 8
    streaming = default_triton_config(spec, 4096)
    assert streaming["head_split"] == 1 and streaming["block_t"] == 1
    assert streaming == default_triton_config(spec, None)
