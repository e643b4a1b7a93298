"""Compiling ahead on threads: which calls are made for which jobs, and on the GPU that the
kernels compiled ahead are the ones the first real calls run."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_GPTJ

from kernels.compile_ahead import compile_ahead, default_compile_threads
from kernels.measure import check_correct
from kernels.providers._triton import default_triton_config
from kernels.providers._triton_kernel import rope_kernel
from kernels.providers._triton_launch import TritonLauncher


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def compile_for(self, positions, query, key, cos_sin_cache) -> None:
        self.calls.append((positions.numel(), key is not None))

    def __call__(self, *args) -> None:  # pragma: no cover - never called here
        raise AssertionError("compile_ahead must not run a callable")


def test_each_job_compiles_with_a_key_and_keyless_only_where_asked():
    keyed, both = _Recorder(), _Recorder()
    started = compile_ahead([(keyed, TINY, False), (both, TINY_GPTJ, True)], "cpu", 7, threads=2)
    assert started == 3
    assert keyed.calls == [(7, True)]
    assert both.calls == [(7, True), (7, False)]


def test_callables_without_compile_for_are_skipped():
    def plain(positions, query, key, cos_sin_cache) -> None:
        raise AssertionError("compile_ahead must not run a callable")

    assert compile_ahead([(plain, TINY, True)], "cpu", 5) == 0


def test_default_threads_are_at_least_one():
    assert 1 <= default_compile_threads() <= 32


@pytest.mark.gpu
def test_the_first_calls_find_their_kernels_compiled_ahead():
    spec = TINY_GPTJ
    configs = [default_triton_config(spec, n) for n in (1, 64, 8192)]
    launchers = [TritonLauncher(spec, dict(c, num_stages=3)) for c in configs]
    jobs = [(launcher, spec, True) for launcher in launchers]
    assert compile_ahead(jobs, "cuda", 101, threads=4) == 2 * len(launchers)
    cache = rope_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(cache)
    for launcher in launchers:
        check_correct(launcher, spec, 101, "cuda", keyless=True, seed=0)
    assert len(cache) == compiled  # nothing compiled by the calls themselves
