"""select_rope: table lookup order, buckets, spec fallback, bad tables, provider fallback,
cache conversion, and a serving-style attention block against a float64 reference."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
import torch
from _reference64 import make_cache, rope64
from conftest import FILE, entry, make_table, put
from torch.nn.functional import scaled_dot_product_attention

import kernels.table as table_mod
from kernels import (
    RopeTableWarning,
    cos_sin_cache,
    get_provider,
    select_rope,
)
from kernels._cast_once import CastOnce
from kernels._spec import RopeSpec
from kernels.providers._torch import TorchProvider
from kernels.table import write_table
from kernels.testing import TOLERANCES, assert_rope_close

SPEC = RopeSpec(
    head_size=64, rotary_dim=32, num_heads=4, num_kv_heads=2, is_neox=True, dtype=torch.float32
)
# -- helpers ---------------------------------------------------------------------------------------


def select(spec: RopeSpec = SPEC, **kwargs):
    return select_rope(
        spec.head_size,
        spec.rotary_dim,
        spec.num_heads,
        spec.num_kv_heads,
        spec.is_neox,
        spec.dtype,
        "cpu",
        **kwargs,
    )


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RopeTableWarning)
        return fn(*args, **kwargs)


def one_warning(match: str, fn, *args, **kwargs):
    """Run ``fn``; exactly one RopeTableWarning, containing ``match``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    ours = [w for w in caught if issubclass(w.category, RopeTableWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert match in str(ours[0].message), str(ours[0].message)
    return result, str(ours[0].message)


@dataclass(frozen=True)
class RecordingProvider(TorchProvider):
    """The torch math, recording (name, token count) per call; optionally needing a key."""

    name: str = "recording"
    description: str = "test provider"
    needs_key: bool = False
    calls: list = field(default_factory=list, compare=False)

    def unsupported_reason(self, spec, *, has_key=True):
        return "needs a key tensor" if self.needs_key and not has_key else None

    def build(self, spec, config):
        inner = super().build(spec, config)

        def run(positions, query, key, cache):
            self.calls.append((self.name, positions.numel()))
            inner(positions, query, key, cache)

        return run


@pytest.fixture
def recorders(registered):
    """Two registered test providers: ``rec_a`` and ``rec_keyed`` (needs a key)."""
    made = {
        "rec_a": RecordingProvider(name="rec_a"),
        "rec_keyed": RecordingProvider(name="rec_keyed", needs_key=True),
    }
    for provider in made.values():
        registered(provider)
    return made


def qk(spec: RopeSpec, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, spec.num_heads * spec.head_size, generator=g).to(spec.dtype)
    k = torch.randn(n, spec.num_kv_heads * spec.head_size, generator=g).to(spec.dtype)
    positions = torch.randint(0, 512, (n,), generator=g)
    return positions, q, k


def rope64_of(
    x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, cache: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (``[T, H*D]`` or ``[T, H, D]``) rotated by the test oracle, float64 ``[T, H, D]``.

    ``cache`` defaults to the standard angles computed in float64 (``_reference64.make_cache``),
    independent of ``cos_sin_cache``; pass the cache a call used to compare with its values.
    """
    if cache is None:
        rows = int(positions.max()) + 1
        cache = make_cache("rope", rows, spec.rotary_dim, torch.float64, torch.Generator())
    x = x.reshape(x.shape[0], -1, spec.head_size)
    return rope64(x.cpu(), positions.cpu(), cache.cpu(), spec.is_neox)[0]


# -- lookup order --------------------------------------------------------------------------------


def test_lookup_order_env_then_user_then_shipped(dirs, monkeypatch):
    for name, provider in (("env", "triton"), ("user", "torch"), ("shipped", "triton")):
        put(dirs[name], make_table({SPEC.key: {"8": entry(provider, median=len(name))}}))
    rope = no_warnings(select)
    assert rope.source == dirs["env"] / FILE
    assert rope.explain(8).provider == "triton"
    assert str(dirs["env"] / FILE) in rope.explain(8).why

    monkeypatch.delenv(table_mod.CONFIG_DIR_ENV)
    rope = no_warnings(select)
    assert (rope.source, rope.explain(8).provider) == (dirs["user"] / FILE, "torch")

    (dirs["user"] / FILE).unlink()
    rope = no_warnings(select)
    assert (rope.source, rope.explain(8).provider) == (dirs["shipped"] / FILE, "triton")


def test_env_dir_without_this_device_falls_through(dirs):
    # A table for another device in the env dir is not this device's table.
    write_table(dirs["env"] / "NVIDIA_H200.json", make_table({SPEC.key: {"8": entry("triton")}}))
    put(dirs["user"], make_table({SPEC.key: {"8": entry("torch")}}))
    assert no_warnings(select).source == dirs["user"] / FILE


def test_exact_spec_in_a_later_source_beats_nearest_in_an_earlier(dirs):
    near = RopeSpec(64, 32, 8, 2, True, torch.float32)
    put(dirs["env"], make_table({near.key: {"8": entry("triton")}}))
    put(dirs["shipped"], make_table({SPEC.key: {"8": entry("torch")}}))
    rope = no_warnings(select)
    assert (rope.source, rope.spec_key) == (dirs["shipped"] / FILE, SPEC.key)


def test_table_dir_argument_replaces_search_path(dirs, tmp_path):
    put(dirs["env"], make_table({SPEC.key: {"8": entry("triton")}}))
    own = tmp_path / "own"
    own.mkdir()
    put(own, make_table({SPEC.key: {"8": entry("torch")}}))
    assert no_warnings(select, table_dir=own).source == own / FILE
    assert no_warnings(select, table_dir=own / FILE).explain(3).provider == "torch"


def test_timing_eager_follows_eager_entries(dirs):
    put(
        dirs["env"],
        make_table(
            graph={SPEC.key: {"8": entry("triton")}}, eager={SPEC.key: {"8": entry("torch")}}
        ),
    )
    assert no_warnings(select).explain(8).provider == "triton"
    eager = no_warnings(select, timing="eager")
    assert eager.explain(8).provider == "torch"
    assert "entries.eager." in eager.explain(8).why
    assert eager.timing == "eager" and no_warnings(select).timing == "graph"
    with pytest.raises(ValueError, match="timing"):
        select(timing="replay")


def test_timing_eager_without_eager_entries_follows_and_says_graph(dirs):
    put(dirs["env"], make_table(graph={SPEC.key: {"8": entry("triton")}}))
    eager = no_warnings(select, timing="eager")
    assert eager.timing == "graph" and eager.explain(8).provider == "triton"
    assert "entries.graph." in eager.explain(8).why


# -- buckets -------------------------------------------------------------------------------------


def nearest_in_log(buckets, n):
    """Independent statement of the rule: nearest bucket in log scale, ties to the smaller."""
    if n <= 0:
        return buckets[0]
    # max/min as an exact fraction: the log distance without float ties going astray.
    return min(buckets, key=lambda b: (Fraction(max(n, b), min(n, b)), b))


@pytest.mark.parametrize("buckets", [(1, 4, 16, 64), (2, 3, 100, 1000, 4096), (256,)])
def test_bucket_boundaries_follow_log_nearest_rule(dirs, recorders, buckets):
    # Alternate providers so a wrong bucket shows up as a wrong provider too.
    names = ["rec_a", "torch"]
    entries = {str(b): entry(names[i % 2], median=b) for i, b in enumerate(buckets)}
    put(dirs["env"], make_table({SPEC.key: entries}))
    rope = no_warnings(select)
    assert rope.buckets == buckets
    for n in [0, 1, 2, 3, 5, 7, 8, 9, 15, 17, 32, 33, 99, 100, 101, 317, 2047, 10**6]:
        expected = nearest_in_log(buckets, n)
        got = rope.explain(n)
        assert got.bucket == expected, (n, got)
        assert got.provider == names[buckets.index(expected) % 2]
        assert f".{expected} (exact spec)" in got.why


def test_calls_run_the_bucket_provider(dirs, recorders):
    put(
        dirs["env"],
        make_table({SPEC.key: {"1": entry("rec_a"), "16": entry("torch"), "64": entry("rec_a")}}),
    )
    rope = no_warnings(select)
    cache = cos_sin_cache(512, SPEC.rotary_dim)
    for n in (1, 3, 4, 5, 31, 32, 33, 200):
        positions, q, k = qk(SPEC, n, seed=n)
        rope(positions, q, k, cache)
    # Boundaries sqrt(16)=4 and sqrt(1024)=32 go to the smaller bucket.
    assert recorders["rec_a"].calls == [
        ("rec_a", 1),
        ("rec_a", 3),
        ("rec_a", 4),
        ("rec_a", 33),
        ("rec_a", 200),
    ]


def test_a_tables_config_reaches_its_bucket_checked(dirs):
    config = {"block_t": 2, "block_h": 4, "head_split": 1, "num_warps": 1, "num_stages": 1}
    put(dirs["env"], make_table({SPEC.key: {"4": entry("triton", config), "64": entry("torch")}}))
    rope = no_warnings(select)
    checked = get_provider("triton").check_config(SPEC, config)
    for n, has_key in ((0, True), (1, True), (16, True), (16, False)):  # 16 = sqrt(4 * 64)
        route = rope.explain(n, has_key=has_key)
        assert (route.bucket, route.provider, route.config) == (4, "triton", checked), n
    for n in (17, 64, 10**6):
        assert (rope.explain(n).bucket, rope.explain(n).provider) == (64, "torch")
    assert rope.explain(17).config == {}


# -- spec fallback -------------------------------------------------------------------------------


def test_nearest_spec_is_used_and_named(dirs):
    asked = RopeSpec(64, 32, 12, 4, True, torch.float32)
    far = RopeSpec(64, 32, 32, 8, True, torch.float32)  # log distance 0.98 + 0.69
    near = RopeSpec(64, 32, 8, 2, True, torch.float32)  # log distance 0.41 + 0.69
    same_heads_other_rotary = RopeSpec(64, 64, 12, 4, True, torch.float32)
    same_heads_other_dtype = RopeSpec(64, 32, 12, 4, True, torch.float16)
    same_heads_other_style = RopeSpec(64, 32, 12, 4, False, torch.float32)
    graph = {
        far.key: {"8": entry("triton")},
        near.key: {"8": entry("torch")},
        same_heads_other_rotary.key: {"8": entry("triton")},
        same_heads_other_dtype.key: {"8": entry("triton")},
        same_heads_other_style.key: {"8": entry("triton")},
    }
    put(dirs["env"], make_table(graph))
    rope = no_warnings(select, asked)
    explained = rope.explain(8)
    assert (rope.spec_key, explained.spec_key, explained.provider) == (near.key, near.key, "torch")
    assert f"nearest spec to {asked.key}" in explained.why and near.key in explained.why


def test_the_other_16_bit_dtype_of_the_same_shape_is_nearest(dirs):
    # A bf16-tuned config runs fp16 at fp16-tuned speed (same bytes moved); a spec of the asked
    # dtype with other head counts is a worse guess, and fp32 (twice the bytes) is no guess.
    asked = RopeSpec(64, 32, 12, 4, True, torch.float16)
    same_shape_bf16 = RopeSpec(64, 32, 12, 4, True, torch.bfloat16)
    other_heads_fp16 = RopeSpec(64, 32, 24, 4, True, torch.float16)
    same_shape_fp32 = RopeSpec(64, 32, 12, 4, True, torch.float32)
    graph = {
        same_shape_bf16.key: {"8": entry("torch")},
        other_heads_fp16.key: {"8": entry("triton")},
        same_shape_fp32.key: {"8": entry("triton")},
    }
    put(dirs["env"], make_table(graph))
    explained = no_warnings(select, asked).explain(8)
    assert (explained.spec_key, explained.provider) == (same_shape_bf16.key, "torch")
    # At equal head distance the asked dtype wins.
    del graph[same_shape_bf16.key]
    graph[RopeSpec(64, 32, 24, 4, True, torch.bfloat16).key] = {"8": entry("torch")}
    put(dirs["env"], make_table(graph))
    explained = no_warnings(select, asked).explain(8)
    assert (explained.spec_key, explained.provider) == (other_heads_fp16.key, "triton")


def test_nearest_spec_config_invalid_for_asked_spec_falls_back_to_default(dirs):
    # block_h=16 is fine for 16 query heads but over the 4 heads asked for.
    near = RopeSpec(64, 32, 16, 2, True, torch.float32)
    config = {"block_t": 1, "block_h": 16, "head_split": 1, "num_warps": 4, "num_stages": 1}
    put(dirs["env"], make_table({near.key: {"8": entry("triton", config)}}))
    explained = no_warnings(select).explain(8)
    assert explained.provider == "triton"
    assert explained.config == get_provider("triton").default_config(SPEC, 8)
    assert "rejected config" in explained.why


def test_no_entry_falls_back_to_torch_on_cpu_with_one_warning(dirs):
    other = RopeSpec(128, 128, 4, 2, True, torch.float32)
    put(dirs["env"], make_table({other.key: {"8": entry("triton")}}))
    rope, message = one_warning("python -m autotune --device cpu", select)
    assert f"--head-size {SPEC.head_size} --rotary-dim {SPEC.rotary_dim}" in message
    assert SPEC.key in message and FILE in message
    explained = rope.explain(100)
    assert (explained.provider, explained.source) == ("torch", None)
    assert explained.why.startswith("fallback")
    no_warnings(select)  # once per process per device and spec
    rope, _ = one_warning(
        "--no-is-neox-style", select, RopeSpec(64, 32, 4, 2, False, torch.float32)
    )


# -- bad tables ----------------------------------------------------------------------------------


def _good() -> dict:
    return make_table({SPEC.key: {"8": entry("triton")}})


def _with(update):
    table = _good()
    update(table)
    return json.dumps(table)


BAD_TABLES = {
    "truncated": (json.dumps(make_table({SPEC.key: {"8": entry("triton")}}))[:-20], "JSON"),
    "entries_not_object": (_with(lambda t: t.update(entries=[1, 2])), "entries"),
    "time_is_string": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(median_us="fast")),
        "median_us",
    ),
    "config_not_object": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(config=[4, 8])),
        "config",
    ),
    "unknown_provider": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(provider="warp_drive")),
        "warp_drive",
    ),
    "negative_time": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"]["providers_us"].update(torch=-3.0)),
        "providers_us.torch",
    ),
    "nan_time": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(median_us=float("nan"))),
        "JSON",  # NaN is not JSON: the strict parser rejects the file
    ),
    "schema_version": (_with(lambda t: t.update(schema_version=2)), "schema_version"),
    "bucket_not_int": (
        _with(lambda t: t["entries"]["graph"][SPEC.key].update({"eight": entry("torch")})),
        "eight",
    ),
    # Buckets that pass str.isdigit() but are not the canonical form str(int(key)).
    "bucket_zero_padded": (
        _with(lambda t: t["entries"]["graph"][SPEC.key].update({"016": entry("torch")})),
        "'016'",
    ),
    "bucket_arabic_indic_digits": (
        _with(lambda t: t["entries"]["graph"][SPEC.key].update({"١٦": entry("torch")})),
        "'١٦'",
    ),
    "bucket_superscript": (
        _with(lambda t: t["entries"]["graph"][SPEC.key].update({"²": entry("torch")})),
        "'²'",
    ),
    # Config values equal to an allowed int but of another type.
    "config_float": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(config={"block_t": 4.0})),
        "block_t",
    ),
    "config_bool": (
        _with(lambda t: t["entries"]["graph"][SPEC.key]["8"].update(config={"num_stages": True})),
        "num_stages",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_warns_once_and_uses_next_source(dirs, case):
    text, fault = BAD_TABLES[case]
    bad = dirs["env"] / FILE
    bad.write_text(text)
    put(dirs["user"], make_table({SPEC.key: {"8": entry("torch")}}))
    rope, message = one_warning(str(bad), select)
    assert fault in message
    assert rope.source == dirs["user"] / FILE and rope.explain(8).provider == "torch"
    no_warnings(select)  # the same fault in the same file: said once
    positions, q, k = qk(SPEC, 16)  # calls run (nothing from the bad table reaches them)
    q0 = q.clone()
    rope(positions, q, k, cos_sin_cache(512, SPEC.rotary_dim))
    assert_rope_close(q, rope64_of(q0, positions, SPEC), SPEC.dtype, "query")


@pytest.mark.parametrize("value", [4.0, True, "4"])
def test_forced_config_value_of_another_type_is_refused(dirs, value):
    get_provider("triton").callable_for(SPEC, {"block_t": 4})  # 4's callable is cached
    with pytest.raises(ValueError, match=r"^config: triton parameter 'block_t'"):
        select(provider="triton", config={"block_t": value})
    with pytest.raises(ValueError, match=r"^config: triton parameter 'block_t'"):
        get_provider("triton").callable_for(SPEC, {"block_t": value})


@pytest.mark.parametrize("case", ["truncated", "unknown_provider"])
def test_bad_table_as_only_source_falls_back(dirs, case):
    (dirs["shipped"] / FILE).write_text(BAD_TABLES[case][0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rope = select()
    messages = [str(w.message) for w in caught if issubclass(w.category, RopeTableWarning)]
    assert len(messages) == 2
    assert str(dirs["shipped"] / FILE) in messages[0] and "python -m autotune" in messages[1]
    assert rope.explain(1).provider == "torch"


def test_unreadable_path_warns_and_falls_through(dirs):
    (dirs["env"] / FILE).mkdir()  # a directory where the file should be
    put(dirs["user"], make_table({SPEC.key: {"8": entry("torch")}}))
    assert no_warnings(select).source == dirs["user"] / FILE


def test_other_library_versions_warn_once_and_entries_are_used(dirs):
    put(
        dirs["env"],
        make_table(
            {SPEC.key: {"8": entry("triton")}}, versions={"torch": "1.0.0", "triton": "0.1"}
        ),
    )
    rope, message = one_warning("torch 1.0.0", select)
    assert "triton 0.1" in message and str(dirs["env"] / FILE) in message
    assert rope.explain(8).provider == "triton"
    no_warnings(select)


# -- unavailable providers -----------------------------------------------------------------------


def test_unavailable_winner_falls_back_to_best_recorded_available(dirs):
    entries = {
        "4": entry("vllm", median=3.0, flashinfer=4.0, torch=9.0, triton=7.0),
        "64": entry("flashinfer", median=5.0, vllm=6.0, torch=8.0),
        "512": entry("vllm", median=5.0, flashinfer=6.0),  # nothing recorded runs here
    }
    put(dirs["env"], make_table({SPEC.key: entries}))
    rope = no_warnings(select)
    small, mid, large = rope.explain(4), rope.explain(64), rope.explain(512)
    assert small.provider == "triton"
    assert small.config == get_provider("triton").default_config(SPEC, 4)
    assert "vllm unavailable here" in small.why and "flashinfer unavailable here" in small.why
    assert "best available recorded (7 us)" in small.why
    assert mid.provider == "torch"
    assert (large.provider, "fallback" in large.why) == ("torch", True)
    cache = cos_sin_cache(512, SPEC.rotary_dim)
    for n in (4, 64, 512):
        positions, q, k = qk(SPEC, n, seed=n)
        q0, k0 = q.clone(), k.clone()
        rope(positions, q, k, cache)
        assert_rope_close(q, rope64_of(q0, positions, SPEC), SPEC.dtype, "query")
        assert_rope_close(k, rope64_of(k0, positions, SPEC), SPEC.dtype, "key")


def test_keyless_calls_use_a_provider_that_takes_no_key(dirs, recorders):
    put(dirs["env"], make_table({SPEC.key: {"8": entry("rec_keyed", median=1.0, rec_a=2.0)}}))
    rope = no_warnings(select)
    assert rope.explain(8).provider == "rec_keyed"
    keyless = rope.explain(8, has_key=False)
    assert keyless.provider == "rec_a" and "rec_keyed does not support" in keyless.why
    cache = cos_sin_cache(512, SPEC.rotary_dim)
    positions, q, k = qk(SPEC, 8)
    q0 = q.clone()
    rope(positions, q, k, cache)
    rope(positions, q0, None, cache)
    assert recorders["rec_keyed"].calls == [("rec_keyed", 8)]
    assert recorders["rec_a"].calls == [("rec_a", 8)]
    torch.testing.assert_close(q0, q, rtol=0, atol=0)


# -- forced provider -----------------------------------------------------------------------------


def test_forced_provider_and_config(dirs):
    put(dirs["env"], make_table({SPEC.key: {"8": entry("triton")}}))
    forced = no_warnings(select, provider="torch")
    assert {forced.explain(n).provider for n in (1, 50, 5000)} == {"torch"}
    assert "forced" in forced.explain(3).why and forced.source is None
    config = {"block_t": 2, "block_h": 2, "head_split": 2, "num_warps": 1, "num_stages": 1}
    forced = no_warnings(select, provider="triton", config=config)
    assert forced.explain(9000).config == config
    cache = cos_sin_cache(512, SPEC.rotary_dim)
    positions, q, k = qk(SPEC, 5)
    q0, k0 = q.clone(), k.clone()
    forced(positions, q, k, cache)
    assert_rope_close(q, rope64_of(q0, positions, SPEC), SPEC.dtype, "query")
    assert_rope_close(k, rope64_of(k0, positions, SPEC), SPEC.dtype, "key")


def test_forced_provider_errors_name_the_argument(dirs, recorders):
    with pytest.raises(KeyError, match="warp_drive"):
        select(provider="warp_drive")
    with pytest.raises(ValueError, match=r"vllm.*unavailable"):
        select(provider="vllm")
    with pytest.raises(ValueError, match="block_t"):
        select(provider="triton", config={"block_t": 3})
    with pytest.raises(ValueError, match="provider="):
        select(config={"block_t": 4})
    keyed = select(provider="rec_keyed")
    positions, q, _ = qk(SPEC, 4)
    with pytest.raises(ValueError, match="key"):
        keyed(positions, q, None, cos_sin_cache(512, SPEC.rotary_dim))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_a_clear_error(dirs):
    with pytest.raises(ValueError, match=r"device: .*no CUDA"):
        select_rope(64, 32, 4, 2, True, torch.float32, "cuda:0")


def test_warning_points_at_the_caller(dirs):
    (dirs["env"] / FILE).write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select()
    assert [w.filename for w in caught] == [__file__, __file__]


def test_check_names_a_mismatched_argument(dirs):
    rope = select(provider="torch")
    cache = cos_sin_cache(512, SPEC.rotary_dim)
    positions, q, k = qk(SPEC, 3)
    rope.check(positions, q, k, cache)
    with pytest.raises(ValueError, match="query: expected 4 heads"):
        rope.check(positions, q[:, :128], k, cache)
    with pytest.raises(ValueError, match="key: expected 2 heads"):
        rope.check(positions, q, q, cache)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rope.check(positions, q, k, cos_sin_cache(512, 16))
    with pytest.raises(ValueError, match="num_tokens"):
        rope.explain(-1)


# -- cache conversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Float32CacheProvider(TorchProvider):
    """Reads a float32 cache only, like FlashInfer: other caches go through CastOnce."""

    name: str = "fp32_cache"
    description: str = "test provider"
    cast: CastOnce = field(default_factory=lambda: CastOnce(torch.float32), compare=False)

    def build(self, spec, config):
        inner, cast = super().build(spec, config), self.cast

        def run(positions, query, key, cache):
            converted = cast(cache)
            assert converted.dtype == torch.float32
            inner(positions, query, key, converted)

        return run


def test_bf16_cache_converted_once_across_calls(dirs, registered):
    provider = registered(Float32CacheProvider())
    spec = RopeSpec(64, 64, 4, 1, False, torch.bfloat16)
    put(dirs["env"], make_table({spec.key: {"1": entry("fp32_cache"), "64": entry("torch")}}))
    rope = no_warnings(select, spec)
    cache = cos_sin_cache(512, spec.rotary_dim, dtype=torch.bfloat16)
    for n in (1, 2, 3, 5, 1, 7, 2, 4):
        positions, q, k = qk(spec, n, seed=n)
        q0 = q.clone()
        rope(positions, q, k, cache)
        # The reference rotates with the same bf16 cache values, upcast.
        assert_rope_close(q, rope64_of(q0, positions, spec, cache), spec.dtype, "query")
    assert provider.cast.conversions == 1
    rope(*qk(spec, 2), cos_sin_cache(512, spec.rotary_dim, dtype=torch.bfloat16))
    assert provider.cast.conversions == 2  # a new cache tensor converts once more


# -- serving-style -------------------------------------------------------------------------------


class AttentionBlock(torch.nn.Module):
    """Fused qkv projection, RoPE on q/k views of it (strided, in place), causal GQA attention."""

    def __init__(self, spec: RopeSpec, hidden: int, rope, cache: torch.Tensor, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.spec, self.rope, self.cache = spec, rope, cache
        width = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_size
        self.qkv = torch.nn.Parameter(
            (torch.randn(hidden, width, generator=g) / hidden**0.5).to(spec.dtype)
        )

    def split(self, qkv):
        s = self.spec
        return qkv.split(
            [s.num_heads * s.head_size, s.num_kv_heads * s.head_size, s.num_kv_heads * s.head_size],
            dim=-1,
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        s = self.spec
        qkv = x @ self.qkv
        q, k, v = self.split(qkv)  # column slices: token stride larger than the width
        self.rope(positions, q, k, self.cache)
        n = x.shape[0]

        def heads(t, h):
            return t.reshape(n, h, s.head_size).transpose(0, 1)

        out = scaled_dot_product_attention(
            heads(q, s.num_heads),
            heads(k, s.num_kv_heads).repeat_interleave(s.num_heads // s.num_kv_heads, 0),
            heads(v, s.num_kv_heads).repeat_interleave(s.num_heads // s.num_kv_heads, 0),
            is_causal=True,
        )
        return out, q, k


def attention64(block: AttentionBlock, x: torch.Tensor, positions: torch.Tensor):
    s = block.spec
    q, k, v = block.split(x.double() @ block.qkv.double())
    q, k = rope64_of(q, positions, s), rope64_of(k, positions, s)
    n, group = x.shape[0], s.num_heads // s.num_kv_heads
    v = v.reshape(n, s.num_kv_heads, s.head_size)
    out = scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1),
        is_causal=True,
    )
    return out


# Attention output: q/k come from a rounded projection, softmax is in the element type.
ATTN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-2, 4e-2)}


@pytest.mark.parametrize(
    "spec",
    [
        RopeSpec(64, 32, 4, 2, True, torch.float32),  # partial rotary, GQA
        RopeSpec(64, 64, 4, 1, False, torch.bfloat16),  # GPT-J, MQA
    ],
    ids=lambda s: s.key,
)
def test_attention_block_over_varying_token_counts(dirs, spec):
    config = {"block_t": 4, "block_h": 2, "head_split": 1, "num_warps": 1, "num_stages": 1}
    put(
        dirs["env"],
        make_table(
            {spec.key: {"1": entry("torch"), "8": entry("triton", config), "64": entry("torch")}}
        ),
    )
    rope = no_warnings(select, spec)
    block = AttentionBlock(spec, hidden=48, rope=rope, cache=cos_sin_cache(1024, spec.rotary_dim))
    g = torch.Generator().manual_seed(1)
    used = set()
    for n in (1, 3, 8, 13, 2, 40, 77, 5):
        x = torch.randn(n, 48, generator=g).to(spec.dtype)
        positions = torch.randint(0, 1024, (n,), generator=g)
        used.add(rope.explain(n).provider)
        rope.check(positions, *block.split(x @ block.qkv)[:2], block.cache)
        with torch.inference_mode():  # as serving stacks run (in-place on split views)
            out, q, k = block(x, positions)
        ref_out = attention64(block, x, positions)
        # RoPE itself: tight, against the rounded projection rotated in float64.
        proj_q, proj_k, _ = block.split(x @ block.qkv)
        assert_rope_close(q, rope64_of(proj_q, positions, spec), spec.dtype, "query")
        assert_rope_close(k, rope64_of(proj_k, positions, spec), spec.dtype, "key")
        atol, rtol = ATTN_TOL[spec.dtype]
        torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
        assert TOLERANCES[spec.dtype][0] <= atol
    assert used == {"torch", "triton"}


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("timing", ["graph", "eager"])
def test_cuda_graph_capture_and_replay(timing):
    spec = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
    rope = select_rope(128, 128, 32, 8, True, torch.bfloat16, "cuda", timing=timing)
    cache = cos_sin_cache(4096, 128, device="cuda")
    graphs = {}
    for n in (1, 7, 64, 300, 4096):
        qkv = torch.empty(n, (32 + 16) * 128, device="cuda", dtype=spec.dtype)
        q, k = qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128]
        positions = torch.zeros(n, dtype=torch.long, device="cuda")
        qkv.normal_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: first launches, cache conversions
            rope(positions, q, k, cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rope(positions, q, k, cache)
        graphs[n] = (graph, qkv, q, k, positions)
    for n, (graph, qkv, q, k, positions) in graphs.items():
        for seed in range(2):
            torch.manual_seed(seed)
            qkv.copy_(torch.randn_like(qkv))
            positions.copy_(torch.randint(0, 4096, (n,), device="cuda"))
            q0, k0 = q.clone(), k.clone()
            graph.replay()
            torch.cuda.synchronize()
            assert_rope_close(q, rope64_of(q0, positions, spec), spec.dtype, "query")
            assert_rope_close(k, rope64_of(k0, positions, spec), spec.dtype, "key")


@pytest.mark.gpu
def test_flashinfer_bf16_cache_converted_once_through_selector():
    flashinfer = get_provider("flashinfer")
    reason = flashinfer.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"flashinfer: {reason}")
    spec = RopeSpec(128, 128, 8, 2, True, torch.bfloat16)
    rope = select_rope(128, 128, 8, 2, True, torch.bfloat16, "cuda", provider="flashinfer")
    cache = cos_sin_cache(2048, 128, dtype=torch.bfloat16, device="cuda")
    before = flashinfer._to_float32.conversions
    for n in (1, 5, 64, 5, 1000):
        positions = torch.randint(0, 2048, (n,), device="cuda")
        q = torch.randn(n, 8 * 128, device="cuda", dtype=spec.dtype)
        k = torch.randn(n, 2 * 128, device="cuda", dtype=spec.dtype)
        q0 = q.clone()
        rope(positions, q, k, cache)
        assert_rope_close(q, rope64_of(q0, positions, spec, cache), spec.dtype, "query")
    assert flashinfer._to_float32.conversions == before + 1
