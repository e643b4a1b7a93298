"""benchmarks/pool_throughput.py: batches of one config per worker, timed after a warm-up, and
an end-to-end run on the CPU."""

import sys
from pathlib import Path

import torch

from autotune.precompile import TritonPrecompiler
from kernels import RopeSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pool_throughput

TINY = RopeSpec(16, 16, 2, 1, True, torch.float32)
GOOD = {"block_t": 1, "block_h": 1, "head_split": 2, "num_warps": 1, "num_stages": 1}


class _RecordingPool(TritonPrecompiler):
    """Records what each call hands the workers (compiling nothing: this is the CPU)."""

    calls: list = []

    def __call__(self, spec, configs):
        self.calls.append((self.workers, self.launch, len(list(configs))))
        return 0


def test_batches_hold_one_config_per_worker_after_a_warm_up():
    configs = [{**GOOD, "num_warps": w, "num_stages": s} for w in (1, 2, 4) for s in (1, 2, 3)]
    warmup = [{**GOOD, "block_t": t} for t in (2, 4, 8, 16)]
    _RecordingPool.calls = []
    seconds, batches = pool_throughput.throughput(
        lambda workers, launch: _RecordingPool("cpu", workers, launch),
        TINY, configs, warmup, workers=2, launch=False,
    )  # fmt: skip
    assert _RecordingPool.calls == [(2, False, 4), *[(2, False, 2)] * 4, (2, False, 1)]
    assert len(batches) == 5 and seconds >= sum(batches) > 0


def test_it_runs_end_to_end_on_the_cpu(capsys):
    argv = ["--device", "cpu", "--configs", "4", "--workers", "1,2"]
    assert pool_throughput.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("q32_kv8_d128_r128_neox_bfloat16, 4 configs per run")
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(mode, workers) for mode, workers, *_ in rows] == [
        ("launch", "1"), ("launch", "2"), ("compile-only", "1"), ("compile-only", "2"),
    ]  # fmt: skip
