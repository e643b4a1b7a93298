"""benchmarks/overlap_check.py: its loads keep the CPU busy only when asked, and it runs end to
end on the CPU (a call that only failed on the H200 would have failed here)."""

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overlap_check


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_spinners_burn_cpu_only_inside_busy():
    with overlap_check.spin_load(1) as busy:
        (spinner,) = multiprocessing.active_children()
        idle_start = _cpu_seconds(spinner.pid)
        time.sleep(0.5)
        idle = _cpu_seconds(spinner.pid) - idle_start
        with busy():
            busy_start = _cpu_seconds(spinner.pid)
            time.sleep(0.5)
            burnt = _cpu_seconds(spinner.pid) - busy_start
    assert burnt >= 0.2, burnt
    assert idle <= 0.05, idle
    assert not spinner.is_alive()  # stopped on leaving the load


def test_compile_load_hands_the_pool_lists_of_configs():
    with overlap_check.compile_load("cpu", 1, seed=0) as busy, busy():
        pass


@pytest.mark.parametrize("load", ["compile", "compile-only", "spin"])
def test_it_runs_end_to_end_on_the_cpu(load, capsys):
    argv = ["--device", "cpu", "--tokens", "1", "--configs", "1", "--workers", "1"]
    assert overlap_check.main([*argv, "--busy", load]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"q32_kv8_d128_r128_neox_bfloat16, 1 {load} workers")
    tokens, configs, effect, noise = lines[-1].split(" | ")
    assert (tokens, configs) == ("1", "1")
    assert float(effect.split()[0]) > 0 and float(noise.split()[0]) > 0
