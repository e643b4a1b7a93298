"""The Triton launchers (RoPE and mRoPE): the fast path (Triton's private
``CompiledKernel.run``) passes the kernel's arguments in signature order, checked on the CPU by
running what it passes through the interpreter; it is pinned to the tested Triton releases, and
any other release takes the public ``kernel[grid](...)`` launch."""

from __future__ import annotations

import pytest
import torch
import triton
from _reference64 import Case, build_inputs, check_outputs, with_
from conftest import case_spec

from kernels import RopeSpec, cos_sin_cache
from kernels.providers import _triton_launch, _triton_mrope
from kernels.providers._triton import default_triton_config
from kernels.providers._triton_kernel import rope_kernel
from kernels.providers._triton_launch import TritonLauncher, fast_launch_supported
from kernels.providers._triton_mrope import MropeLauncher
from kernels.providers._triton_mrope_kernel import mrope_kernel
from kernels.testing import assert_rope_close, rope_reference


class _Compiled:
    """Stands in for Triton's compiled kernel: ``run`` takes the arguments the way Triton's
    own launch passes them and runs the interpreted kernel on them, matched by position to the
    kernel's signature, so a wrong order computes a wrong result."""

    function = object()
    packed_metadata = object()

    def __init__(self, recorder: RecordingKernel) -> None:
        self.recorder = recorder

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
            enter_hook, exit_hook, *args):  # fmt: skip
        assert (function, packed_metadata) == (self.function, self.packed_metadata)
        assert (grid_z, launch_metadata, enter_hook, exit_hook) == (1, None, None, None)
        kernel = self.recorder.kernel
        assert len(args) == len(kernel.arg_names), args
        self.recorder.fast_launches += 1
        kernel[(grid_x, grid_y)](**dict(zip(kernel.arg_names, args, strict=True)))


class RecordingKernel:
    """A JIT kernel (``rope_kernel`` unless told) whose public launch, which compiles on a GPU,
    also hands back a :class:`_Compiled`."""

    def __init__(self, kernel=rope_kernel) -> None:
        self.kernel = kernel
        self.public_launches = 0
        self.fast_launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.public_launches += 1
            self.kernel[grid](*args, **kwargs)
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


@pytest.mark.parametrize("mrope", [False, True], ids=["rope", "mrope"])
def test_fast_path_never_runs_a_kernel_compiled_for_other_alignment_or_strides(mrope, monkeypatch):
    """The fast path's key holds each pointer's 16-byte alignment and the strides' values: a
    call that differs in either takes the public launch (Triton compiles or finds its kernel)
    and gets an entry of its own; a call like an earlier one takes that one's."""
    monkeypatch.setattr(_triton_launch, "_current_stream", lambda index: 0)
    monkeypatch.setattr(_triton_mrope, "_current_stream", lambda index: 0)
    section = (8, 12, 12) if mrope else None
    spec = RopeSpec(64, 64, 4, 2, True, torch.float32, mrope_section=section)
    kernel = RecordingKernel(mrope_kernel if mrope else rope_kernel)
    launcher_class = MropeLauncher if mrope else TritonLauncher
    launcher = launcher_class(spec, default_triton_config(spec, 4), kernel=kernel, fast=True)
    q_width, k_width = 4 * 64, 2 * 64
    cache = cos_sin_cache(64, 64)

    def fused(offset: int, seed: int):  # q and k: column slices of a qkv buffer at ``offset``
        g = torch.Generator().manual_seed(seed)
        qkv = torch.randn(offset + 5 * (q_width + 2 * k_width), generator=g)[offset:]
        qkv = qkv.view(5, q_width + 2 * k_width)
        return qkv[:, :q_width], qkv[:, q_width : q_width + k_width]

    def separate(seed: int):  # q and k: tensors of their own (other token strides)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(5, q_width, generator=g), torch.randn(5, k_width, generator=g)

    calls = [fused(0, 0), fused(0, 1), fused(1, 2), fused(1, 3), separate(4), fused(0, 5)]
    for seed, (query, key) in enumerate(calls):
        shape = (3, 5) if mrope else (5,)
        positions = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))
        expected_q, expected_k = rope_reference(
            positions, query, key, cache, 64, True, mrope_section=section
        )
        launcher(positions, query, key, cache)
        assert_rope_close(query, expected_q, spec.dtype, "query")
        assert_rope_close(key, expected_k, spec.dtype, "key")
    assert query.data_ptr() % 16 == 0 and calls[2][0].data_ptr() % 16 == 4
    assert (kernel.public_launches, kernel.fast_launches) == (3, 3)
    assert len(launcher.compiled) == 3


def test_strides_varying_per_call_keep_the_fast_path_cache_bounded(monkeypatch):
    """``[1, S, H, D]`` views of a ``[1, H, S, D]`` tensor: the head stride is S * D, so each
    sequence length is a fast-path entry of its own; past MAX_FAST_ENTRIES the cache starts
    over, and every call stays right."""
    monkeypatch.setattr(_triton_launch, "_current_stream", lambda index: 0)
    monkeypatch.setattr(_triton_launch, "MAX_FAST_ENTRIES", 3)
    spec = RopeSpec(16, 16, 2, 1, True, torch.float32)
    kernel = RecordingKernel()
    launcher = TritonLauncher(spec, default_triton_config(spec, 4), kernel=kernel, fast=True)
    cache = cos_sin_cache(64, 16)
    for seq in (3, 4, 5, 6, 7, 3):
        g = torch.Generator().manual_seed(seq)
        query = torch.randn(1, 2, seq, 16, generator=g).transpose(1, 2)
        key = torch.randn(1, 1, seq, 16, generator=g).transpose(1, 2)
        positions = torch.randint(0, 64, (1, seq), generator=g)
        expected_q, expected_k = rope_reference(positions, query, key, cache, 16, True)
        launcher(positions, query, key, cache)
        assert_rope_close(query, expected_q, spec.dtype, "query")
        assert_rope_close(key, expected_k, spec.dtype, "key")
        assert len(launcher.compiled) <= 3
    assert kernel.public_launches == 6  # the last S=3 was dropped when the cache started over


MROPE_SPECS = [
    RopeSpec(64, 64, 4, 2, True, torch.float32, mrope_section=(8, 12, 12)),
    RopeSpec(64, 48, 3, 1, False, torch.float32, mrope_section=(8, 8, 8), mrope_interleaved=True),
]


@pytest.mark.parametrize("spec", MROPE_SPECS, ids=lambda s: s.key)
def test_mrope_fast_path_and_one_compile_for_both_position_forms(spec, monkeypatch):
    """``[3, T]`` positions (a slice of a longer buffer) and text-only ``[T]`` positions run
    one compiled kernel: the first call compiles (public launch), every later one, text-only
    included, takes the fast path with the arguments in signature order."""
    monkeypatch.setattr(_triton_mrope, "_current_stream", lambda index: 0)
    recorder = RecordingKernel(mrope_kernel)
    launcher = MropeLauncher(spec, default_triton_config(spec, 4), kernel=recorder, fast=True)
    width = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_size
    q_width, k_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    cache = cos_sin_cache(64, spec.rotary_dim)
    for seed, text_only in enumerate((False, True, False, True)):
        g = torch.Generator().manual_seed(seed)
        qkv = torch.randn(5, width, generator=g)
        buffer = torch.randint(0, 64, (3, 7), generator=g)
        positions = buffer[0, :5].clone() if text_only else buffer[:, :5]
        query, key = qkv[:, :q_width], qkv[:, q_width : q_width + k_width]
        expected_q, expected_k = rope_reference(
            positions, query, key, cache, spec.head_size, spec.is_neox,
            mrope_section=spec.mrope_section, mrope_interleaved=spec.mrope_interleaved,
        )  # fmt: skip
        launcher(positions, query, key, cache)
        assert_rope_close(query, expected_q, spec.dtype, "query")
        assert_rope_close(key, expected_k, spec.dtype, "key")
    assert (recorder.public_launches, recorder.fast_launches) == (1, 3)


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
