"""benchmarks/table_summary.py: counts of Triton's wins and losses and the choice's speedups."""

from pathlib import Path

import pytest
from conftest import load_benchmark

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "table_summary.py"


@pytest.fixture(scope="module")
def module():
    return load_benchmark("table_summary")


@pytest.fixture(scope="module")
def summarize(module):
    return module.summarize


def _entry(**times: float) -> dict:
    provider = min(times, key=times.get)
    return {"provider": provider, "median_us": times[provider], "providers_us": times}


def _table(**extra_graph: dict) -> dict:
    """Llama-3-70B TP8 in bf16 (a win and a 10% loss) and fp16 (a tie), plus ``extra_graph``."""
    graph = {
        "q8_kv1_d128_r128_neox_bfloat16": {
            "1": _entry(triton=1.0, flashinfer=2.0, vllm=4.0),
            "256": _entry(triton=3.3, flashinfer=3.0, vllm=6.0),
        },
        "q8_kv1_d128_r128_neox_float16": {"16": _entry(triton=1.0, vllm=1.0)},
    }
    return {"entries": {"graph": {**graph, **extra_graph}}}


def test_counts_losses_and_speedups_per_dtype(summarize):
    table = _table()
    text = summarize(table)
    assert "bfloat16: 1 specs, 2 buckets" in text
    assert "no slower than the faster of flashinfer/vllm: 1 of 2" in text
    assert (
        "q8_kv1_d128_r128_neox_bfloat16 @ 256: triton 3.30 us, best rival 3.00 us (+10.0%)" in text
    )
    # The choice (fastest provider) against FlashInfer: 2x and 1x, geomean sqrt(2).
    assert "choice vs flashinfer: 1.41x geomean (1.00x to 2.00x, 2 buckets)" in text
    # A tie is no loss.
    assert (
        "float16: 1 specs, 1 buckets\n  triton no slower than the faster of flashinfer/vllm: 1 of 1"
        in text
    )
    assert summarize(table, timing="eager") == ""


def test_ratio_table_has_a_row_per_spec_and_a_column_per_bucket(module):
    table = _table(q4_kv1_d128_r128_neox_bfloat16={"16": _entry(triton=1.8, vllm=2.0)})
    assert module.ratio_table(table, "bfloat16").splitlines() == [
        "| spec | 1 | 16 | 256 |",
        "|---|---|---|---|",
        "| q4_kv1_d128_r128_neox | - | 0.90 | - |",
        "| q8_kv1_d128_r128_neox | 0.50 | - | 1.10 |",
    ]
