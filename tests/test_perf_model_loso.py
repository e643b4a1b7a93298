"""benchmarks/perf_model_loso.py --measure: gate and time a listing, report what fails."""

import csv
import json

import pytest
from conftest import TINY, load_benchmark

from autotune.perf_model_fit import read_rows


@pytest.fixture(scope="module")
def measure():
    return load_benchmark("perf_model_loso").measure


def _listing(path, rows):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["spec", "tokens", "provider", "config"])
        for spec_key, tokens, provider, config in rows:
            out.writerow([spec_key, tokens, provider, json.dumps(config) if config else ""])


GOOD = {"block_t": 1, "block_h": 2, "head_split": 1, "num_warps": 1, "num_stages": 1}


def test_times_each_row_and_reports_configs_that_cannot_run(tmp_path, measure, capsys):
    listing, out = tmp_path / "missing.csv", tmp_path / "measured.csv"
    bad = {**GOOD, "block_h": 3}  # not a power of two: refused when the callable is built
    _listing(
        listing,
        [(TINY.key, 5, "triton", GOOD), (TINY.key, 3, "triton", bad), (TINY.key, 2, "torch", None)],
    )
    assert measure(str(listing), "cpu", str(out), repeats=1, index=0, count=1) == 0

    rows = read_rows(out)
    assert [(r.spec_key, r.tokens, r.provider, r.config) for r in rows] == [
        (TINY.key, 5, "triton", GOOD),
        (TINY.key, 2, "torch", None),
    ]
    assert all(r.median_us > 0 for r in rows)
    assert f"{TINY.key} 3 triton" in capsys.readouterr().out


def test_a_shard_takes_every_nth_row(tmp_path, measure):
    listing, out = tmp_path / "missing.csv", tmp_path / "measured.csv"
    _listing(listing, [(TINY.key, tokens, "torch", None) for tokens in (1, 2, 3, 4, 5)])
    measure(str(listing), "cpu", str(out), repeats=1, index=1, count=2)
    assert [r.tokens for r in read_rows(out)] == [2, 4]
