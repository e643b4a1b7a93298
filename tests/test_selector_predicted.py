"""select_rope with a performance model beside the table: predicted routes for a spec the
table lacks, exact entries first, token counts between tuned buckets, eager timing on graph
entries, and a bad model file that warns and is not used."""

import pytest
import torch
from conftest import FILE, entry, make_table, perf_model_data, put, put_model

from kernels import RopeTableWarning, cos_sin_cache, get_provider, select_rope
from kernels.perf_model import model_file_name
from kernels.table import device_metadata
from kernels.testing import assert_rope_close, rope_reference

SPEC = dict(head_size=64, rotary_dim=32, num_heads=4, num_kv_heads=2, is_neox=True)
DTYPE = torch.float32
MODEL_FILE = model_file_name(device_metadata("cpu")["device_name"])


def _select(**kwargs):
    return select_rope(**SPEC, dtype=DTYPE, device="cpu", **kwargs)


def _key() -> str:
    from kernels import RopeSpec

    return RopeSpec(**SPEC, dtype=DTYPE).key


def test_a_spec_the_table_lacks_runs_the_predicted_fastest(dirs):
    put_model(dirs["shipped"], perf_model_data(torch_log_us=5.0, triton_log_us=1.0))
    rope = _select()
    assert rope.source == dirs["shipped"] / MODEL_FILE
    for tokens in (1, 37, 4096):
        explained = rope.explain(tokens)
        assert explained.provider == "triton" and "predicted" in explained.why
        assert f"{torch.tensor(1.0).exp().item():.3g} us" in explained.why
        assert not get_provider("triton").config_fault(explained.config)
    # The model's other verdict: torch predicted faster.
    put_model(dirs["env"], perf_model_data(torch_log_us=0.5, triton_log_us=3.0))
    assert _select().explain(37).provider == "torch"


def test_the_predicted_route_computes_rope(dirs):
    put_model(dirs["shipped"], perf_model_data(torch_log_us=5.0, triton_log_us=1.0))
    rope = _select()
    gen = torch.Generator().manual_seed(0)
    tokens = 7
    qkv = torch.randn(tokens, (4 + 2 * 2) * 64, generator=gen)
    q, k = qkv[:, : 4 * 64], qkv[:, 4 * 64 : 6 * 64]
    positions = torch.randint(0, 256, (tokens,), generator=gen)
    cache = cos_sin_cache(256, 32)
    expected_q, expected_k = rope_reference(positions, q, k, cache, 64, True)
    rope(positions, q, k, cache)
    assert_rope_close(q, expected_q, DTYPE, "query")
    assert_rope_close(k, expected_k, DTYPE, "key")


def test_an_exact_entry_wins_and_the_model_decides_between_buckets(dirs):
    # The table: torch at 1 and 4096 tokens. The model predicts triton 20x faster.
    put(dirs["env"], make_table({_key(): {"1": entry("torch"), "4096": entry("torch")}}))
    put_model(dirs["env"], perf_model_data(torch_log_us=4.0, triton_log_us=1.0))
    rope = _select()
    assert rope.source == dirs["env"] / FILE
    assert rope.explain(1).provider == rope.explain(4096).provider == "torch"
    between = rope.explain(64)
    assert between.provider == "triton" and "between tuned buckets 1 and 4096" in between.why
    # A model that sees no margin keeps the neighbours' measured winner.
    put_model(dirs["env"], perf_model_data(torch_log_us=1.0, triton_log_us=0.95))
    assert _select().explain(64).provider == "torch"


def test_eager_timing_follows_the_graph_entries_when_the_table_has_no_eager_ones(dirs):
    put(dirs["env"], make_table({_key(): {"8": entry("torch")}}))
    explained = _select(timing="eager").explain(8)
    assert explained.provider == "torch" and "entries.graph." in explained.why


@pytest.mark.parametrize("content", [b"{", b'{"schema_version": 99}'], ids=["json", "schema"])
def test_a_bad_model_warns_and_the_table_rules_apply(dirs, content):
    put_model(dirs["env"], content)
    with pytest.warns(RopeTableWarning):
        rope = _select()
    assert rope.explain(8).provider == "torch" and rope.explain(8).why.startswith("fallback")
