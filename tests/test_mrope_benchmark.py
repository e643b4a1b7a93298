"""``benchmarks/mrope.py``'s report: its text file names the device and the copy bandwidth."""

from __future__ import annotations

import csv

from conftest import load_benchmark

mrope = load_benchmark("mrope")


def row(impl, median, vs_vllm):
    return {
        "device": "NVIDIA H100 80GB HBM3", "vllm": "0.26.0", "model": "qwen2-vl-2b",
        "spec": "q12_kv2_d128_r128_neox_bfloat16_mrope16-24-24", "tokens": 16384, "impl": impl,
        "choice": "-", "correct": True, "p20_us": median, "median_us": median, "p80_us": median,
        "floor_us": "40.86", "pct_floor": "81", "speedup_vs_vllm": vs_vllm,
        "speedup_vs_inductor": "8.40",
    }  # fmt: skip


def test_report_files_name_the_device_and_bandwidth(tmp_path, capsys):
    rows = [row("vllm", "169.35", "1.00"), row("triton_mrope", "50.18", "3.37"),
            row("select_rope", "50.23", "3.37")]  # fmt: skip
    mrope.write(rows, str(tmp_path), 2.99e12)
    text = (tmp_path / "mrope.txt").read_text()
    assert text.startswith("NVIDIA H100 80GB HBM3, vLLM 0.26.0, copy bandwidth 2.99 TB/s\n")
    assert "| qwen2-vl-2b | 16384 | triton_mrope | - | yes | 50.18 | 40.86 | 81 |" in text
    assert "qwen2-vl-2b select_rope: geomean x3.37 over vLLM" in text
    assert capsys.readouterr().out == text
    with open(tmp_path / "mrope.csv", newline="") as f:
        assert [r["impl"] for r in csv.DictReader(f)] == ["vllm", "triton_mrope", "select_rope"]
