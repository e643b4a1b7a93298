"""``benchmarks/vllm_layer.py`` end to end on the CPU, vLLM's op stood in for.

vLLM's compiled op does not exist here, so a subprocess registers a CPU op of its schema where
vLLM registers it (``torch.ops._C.rotary_embedding``, computing RoPE with the ``torch``
provider's math), through which vLLM's layers and the ``vllm`` provider both run. The table
makes the ``vllm`` provider the winner, so the override's rows run its direct route to the op.
"""

import csv
import os
import subprocess
import sys

import pytest
from conftest import ROOT, entry, make_table, put

pytest.importorskip("vllm.model_executor.layers.rotary_embedding")

STAND_IN = """
import sys
import torch
sys.path.insert(0, "benchmarks")
from kernels import get_provider
from kernels.providers._torch import rope_torch_

library = torch.library.Library("_C", "FRAGMENT")
library.define(
    "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
    "Tensor cos_sin_cache, bool is_neox) -> ()"
)

def rotary_embedding(positions, query, key, head_size, cache, is_neox):
    n = positions.numel()
    k = None if key is None else key.view(n, -1, head_size)
    rope_torch_(positions, query.view(n, -1, head_size), k, cache, cache.shape[-1], is_neox)

library.impl("rotary_embedding", rotary_embedding, "CPU")
type(get_provider("vllm")).unavailable_reason = lambda self, device: None
import vllm_layer
sys.exit(vllm_layer.main(sys.argv[1:]))
"""
LLAMA3_8B = "q32_kv8_d128_r128_neox_bfloat16"


@pytest.mark.slow
def test_rows_run_the_table_winner_and_match_vllm(tmp_path):
    buckets = ("1", "16", "256")
    put(tmp_path, make_table(graph={LLAMA3_8B: {b: entry("vllm") for b in buckets}}))
    argv = ["--device", "cpu", "--models", "llama3-8b", "--tokens", "3,17", "--no-compiled",
            "--repeats", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "ROPE_AUTOTUNE_CONFIG_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", STAND_IN, *argv], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "out" / "vllm_layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tokens"] for r in rows] == ["3", "17"]
    for row in rows:
        assert row["spec"] == LLAMA3_8B and row["provider"] == "vllm"
        assert row["within_tolerance"] == "True" and row["bit_identical"] == "True"
        assert float(row["ours_graph_us"]) > 0 and float(row["ours_eager_us"]) > 0
