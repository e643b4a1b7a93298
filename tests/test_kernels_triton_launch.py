"""The Triton launcher: its fast path (Triton's private ``CompiledKernel.run``) passes the
kernel's arguments in signature order, checked on the CPU by running what it passes through the
interpreter; it is pinned to the tested Triton releases, and any other release takes the public
``kernel[grid](...)`` launch."""

from __future__ import annotations

import pytest
import torch
import triton
from _reference64 import Case, build_inputs, check_outputs, with_
from conftest import case_spec

from kernels.providers import _triton_launch
from kernels.providers._triton import default_triton_config
from kernels.providers._triton_kernel import rope_kernel
from kernels.providers._triton_launch import TritonLauncher, fast_launch_supported


class _Compiled:
    """Stands in for Triton's compiled kernel: ``run`` takes the arguments the way Triton's
    own launch passes them and runs the interpreted kernel on them, matched by position to the
    kernel's signature, so a wrong order computes a wrong result."""

    function = object()
    packed_metadata = object()

    def __init__(self, kernel: RecordingKernel) -> None:
        self.kernel = kernel

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
            enter_hook, exit_hook, *args):  # fmt: skip
        assert (function, packed_metadata) == (self.function, self.packed_metadata)
        assert (grid_z, launch_metadata, enter_hook, exit_hook) == (1, None, None, None)
        assert len(args) == len(rope_kernel.arg_names), args
        self.kernel.fast_launches += 1
        rope_kernel[(grid_x, grid_y)](**dict(zip(rope_kernel.arg_names, args, strict=True)))


class RecordingKernel:
    """``rope_kernel`` whose public launch also hands back a :class:`_Compiled`."""

    def __init__(self) -> None:
        self.public_launches = 0
        self.fast_launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.public_launches += 1
            rope_kernel[grid](*args, **kwargs)
            return _Compiled(self)

        return launch


CASES = [
    Case(head_size=64, rotary_dim=32, num_heads=4, num_kv_heads=2, layout="qkv", num_tokens=7),
    Case(head_size=96, rotary_dim=24, num_heads=6, num_kv_heads=None, is_neox=False,
         layout="flat", num_tokens=5),
    Case(head_size=64, rotary_dim=64, num_heads=4, num_kv_heads=1, layout="bs_heads",
         num_tokens=6),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fast_path_passes_the_kernels_arguments_in_order(case, monkeypatch):
    monkeypatch.setattr(_triton_launch, "_current_stream", lambda index: 0)
    spec = case_spec(case)
    kernel = RecordingKernel()
    launcher = TritonLauncher(spec, default_triton_config(spec, 4), kernel=kernel, fast=True)
    for seed in range(3):  # the first call compiles (public launch), the others take run()
        inputs = build_inputs(with_(case, cache_kind="exact"), seed)
        launcher(inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache)
        check_outputs(inputs, case.dtype)
    assert (kernel.public_launches, kernel.fast_launches) == (1, 2)


@pytest.mark.parametrize("version", ["3.6.0", "3.6.1", "3.9.0", "3.9.0+git1234"])
def test_tested_releases_take_the_fast_path(version):
    assert fast_launch_supported(version)


@pytest.mark.parametrize("version", ["3.5.1", "3.7.0", "3.10.0", "4.0.0", "3.60.0"])
def test_other_releases_take_the_public_launch(version, monkeypatch):
    assert not fast_launch_supported(version)
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(_triton_launch, "_interpreting", lambda: False)
    case = CASES[0]
    spec = case_spec(case)
    kernel = RecordingKernel()
    launcher = TritonLauncher(spec, default_triton_config(spec, 4), kernel=kernel)
    assert launcher.fast is False
    for seed in range(2):
        inputs = build_inputs(case, seed)
        launcher(inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache)
        check_outputs(inputs, case.dtype)
    assert (kernel.public_launches, kernel.fast_launches) == (2, 0)


@pytest.mark.skipif(not _triton_launch._interpreting(), reason="runs under TRITON_INTERPRET=1")
def test_interpreter_takes_the_public_launch():
    spec = case_spec(CASES[0])
    assert TritonLauncher(spec, default_triton_config(spec, 4)).fast is False


@pytest.mark.gpu
def test_fast_path_is_taken_on_the_gpu():
    assert fast_launch_supported(triton.__version__), (
        f"Triton {triton.__version__} is not in FAST_LAUNCH_VERSIONS: test the fast path on it "
        "and add it, or expect the public launch's host cost"
    )
    case = with_(CASES[0], num_tokens=64)
    spec = case_spec(case)
    launcher = TritonLauncher(spec, default_triton_config(spec, 64))
    assert launcher.fast
    for seed in range(3):
        inputs = build_inputs(case, seed, "cuda")
        launcher(inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache)
        torch.cuda.synchronize()
        check_outputs(inputs, case.dtype)
    assert len(launcher.compiled) == 1  # one specialization, compiled once, then run() twice
