"""Correctness gate and timing for one RoPE callable on one spec and token count.

The one measurement of the project: the tuner (``autotune``), ``verify``, the benchmarks and
tuning on first use (:mod:`kernels.first_use`) all gate and time through it. It needs torch
alone.

Inputs imitate a serving stack: q and k are column slices of a fused ``[T, (Hq + 2*Hk) * D]``
qkv tensor (the layout vLLM hands to its rotary op), positions are random in a
``max_position``-row cache, and nothing is zero. An mRoPE spec's positions are ``[3, T]``, a
column slice of a longer buffer as vLLM's ``mrope_positions`` are. Timing never builds or
clones inputs inside the timed region.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from ._cos_sin_cache import cos_sin_cache
from ._spec import RopeSpec
from .providers import RopeFn
from .testing import assert_rope_close, rope_reference

__all__ = [
    "GATE_TOKENS",
    "MAX_POSITION",
    "RopeInputs",
    "Timing",
    "check_correct",
    "copy_bandwidth",
    "make_inputs",
    "time_rope",
]

# Rows of the cos/sin cache the inputs index (positions are random below it).
MAX_POSITION = 8192
# The correctness gate's token count: odd, and more than the largest token block (64), so a
# full block and a masked partial block are both checked.
GATE_TOKENS = 101
# Input sets are rotated until they cover this many times the L2, so each call reads HBM.
_L2_COVER = 3
_MAX_SETS = 64
_MAX_ROTATION_BYTES = 8 << 30
# Warm-up rounds at most, when a call keeps getting faster (see _warm_up).
_MAX_WARMUP_ROUNDS = 20


@dataclass(frozen=True)
class Timing:
    """Per-call time in microseconds: 20th percentile, median, 80th percentile."""

    p20_us: float
    median_us: float
    p80_us: float


@dataclass(frozen=True)
class RopeInputs:
    """One call's arguments; ``qkv`` owns the memory that ``query`` and ``key`` view."""

    positions: torch.Tensor
    qkv: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor | None
    cos_sin_cache: torch.Tensor

    @property
    def args(self) -> tuple:
        return self.positions, self.query, self.key, self.cos_sin_cache


def make_inputs(
    spec: RopeSpec,
    num_tokens: int,
    device: torch.device | str,
    *,
    with_key: bool = True,
    generator: torch.Generator | None = None,
    cache: torch.Tensor | None = None,
    text_only: bool = False,
) -> RopeInputs:
    """Random inputs for one call, q and k as strided views of a fused qkv tensor (``key`` None
    without ``with_key``), a float32 cos/sin cache unless ``cache`` is given.

    An mRoPE spec's positions are ``[3, T]`` (three independent streams, a column slice of a
    ``[3, T + 1]`` buffer), or ``[T]`` with ``text_only``."""
    device = torch.device(device)
    q_width = spec.num_heads * spec.head_size
    kv_width = spec.num_kv_heads * spec.head_size
    qkv = torch.randn(
        num_tokens, q_width + 2 * kv_width, generator=generator, device=device, dtype=torch.float32
    ).to(spec.dtype)
    streams = 3 if spec.is_mrope and not text_only else 1
    positions = torch.randint(
        0, MAX_POSITION, (streams, num_tokens + (streams > 1)), generator=generator,
        device=device, dtype=torch.int64,
    )[:, :num_tokens]  # fmt: skip
    if streams == 1:
        positions = positions[0].contiguous()
    if cache is None:
        cache = cos_sin_cache(MAX_POSITION, spec.rotary_dim, dtype=torch.float32, device=device)
    query = qkv[:, :q_width]
    key = qkv[:, q_width : q_width + kv_width] if with_key else None
    return RopeInputs(positions, qkv, query, key, cache)


def check_correct(
    fn: RopeFn,
    spec: RopeSpec,
    num_tokens: int,
    device: torch.device | str,
    *,
    keyless: bool = True,
    seed: int | None = None,
) -> None:
    """Run ``fn`` on fresh random inputs, with a key and (with ``keyless``, for providers that
    take calls without one) without, and compare with the float64 reference. An mRoPE spec is
    also checked with text-only ``[T]`` positions (with a key).

    Also checks that everything outside the rotated slices (head tails, the v columns) is
    bit-identical.

    Raises:
        AssertionError: a wrong result. Kernel errors (compile failures, out of memory)
            propagate as they are.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % (1 << 62))
    for with_key in (True, False) if keyless else (True,):
        inputs = make_inputs(spec, num_tokens, device, with_key=with_key, generator=gen)
        _check_once(fn, spec, inputs)
    if spec.is_mrope:
        inputs = make_inputs(spec, num_tokens, device, generator=gen, text_only=True)
        _check_once(fn, spec, inputs)


def _check_once(fn: RopeFn, spec: RopeSpec, inputs: RopeInputs) -> None:
    before = inputs.qkv.clone()
    expected_q, expected_k = rope_reference(
        *inputs.args, spec.head_size, spec.is_neox,
        mrope_section=spec.mrope_section, mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip
    fn(*inputs.args)
    if inputs.qkv.device.type == "cuda":
        torch.cuda.synchronize(inputs.qkv.device)
    assert_rope_close(inputs.query, expected_q, spec.dtype, "query")
    if inputs.key is not None:
        assert_rope_close(inputs.key, expected_k, spec.dtype, "key")
    # Everything the kernel must not touch: compare raw bits.
    untouched = torch.ones_like(before, dtype=torch.bool)
    heads = spec.num_heads + (spec.num_kv_heads if inputs.key is not None else 0)
    rotated = untouched[:, : heads * spec.head_size].view(-1, heads, spec.head_size)
    rotated[..., : spec.rotary_dim] = False
    bits = _int_type(spec.dtype)
    same = before.view(bits) == inputs.qkv.view(bits)
    if not bool(same[untouched].all()):
        where = "without a key" if inputs.key is None else "with a key"
        raise AssertionError(f"elements outside the rotated slices changed ({where})")


def _int_type(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[dtype.itemsize]


def _input_sets(
    spec: RopeSpec,
    num_tokens: int,
    device: torch.device,
    rotate: bool,
    seed: int | None,
    with_key: bool,
) -> list[RopeInputs]:
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    first = make_inputs(spec, num_tokens, device, with_key=with_key, generator=gen)
    count = 1
    if rotate and device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        touched = spec.bytes_moved(num_tokens, with_key=with_key)
        footprint = first.qkv.nbytes + first.positions.nbytes
        count = min(
            _MAX_SETS, math.ceil(_L2_COVER * l2 / touched), max(1, _MAX_ROTATION_BYTES // footprint)
        )
    # One cache for all sets: serving stacks share one too.
    return [first] + [
        make_inputs(
            spec, num_tokens, device, with_key=with_key, generator=gen, cache=first.cos_sin_cache
        )
        for _ in range(count - 1)
    ]


def _percentiles(per_call_us: list[float]) -> Timing:
    if len(per_call_us) == 1:
        return Timing(per_call_us[0], per_call_us[0], per_call_us[0])
    q = statistics.quantiles(per_call_us, n=10, method="inclusive")
    return Timing(p20_us=q[1], median_us=statistics.median(per_call_us), p80_us=q[7])


def time_rope(
    fn: RopeFn,
    spec: RopeSpec,
    num_tokens: int,
    device: torch.device | str,
    *,
    mode: str = "graph",
    with_key: bool = True,
    rotate: bool = True,
    seed: int | None = None,
    repeats: int = 50,
    min_round_s: float = 0.002,
    phases: dict[str, float] | None = None,
) -> Timing:
    """Time one call of ``fn`` (microseconds).

    Args:
        fn: A bound provider callable ``fn(positions, query, key, cos_sin_cache)``.
        mode: ``"graph"``: the calls over all rotating input sets captured in one CUDA graph,
            timed by CUDA events over replays (what a serving stack running CUDA graphs pays).
            ``"eager"``: back-to-back calls without synchronization, host wall time per call, so
            launch cost counts when it exceeds the GPU time. On the CPU both are wall time.
        with_key: Time calls with a key tensor (else key-less calls).
        rotate: Rotate input sets covering 3x the L2 so that data comes from memory.
        repeats: Timed rounds; the result is the median and p20/p80 over rounds.
        min_round_s: Each round runs enough calls to last at least this long.
        phases: If given, receives the host seconds spent building inputs (``"inputs"``), in
            the warm-up calls (``"warmup"``: compiling, loading) and measuring (``"measure"``).
    """
    if mode not in ("graph", "eager"):
        raise ValueError(f"mode: expected 'graph' or 'eager', got {mode!r}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        sync(device)
        clock.append(time.perf_counter())
        if phases is not None:
            phases[name] = clock[-1] - clock[-2]

    sets = _input_sets(spec, num_tokens, device, rotate, seed, with_key)
    args = [s.args for s in sets]
    lap("inputs")
    _warm_up(fn, args, device)
    lap("warmup")
    if device.type != "cuda" or mode == "eager":
        timing = _time_wall(fn, args, device, repeats, min_round_s)
    else:
        timing = _time_graph(fn, args, device, repeats, min_round_s)
    lap("measure")
    return timing


def _warm_up(fn: RopeFn, args: list[tuple], device: torch.device) -> None:
    """Call ``fn`` over every input set until a round is no faster than 0.9x the round before
    (at least two rounds, at most :data:`_MAX_WARMUP_ROUNDS`), so that compiles, recompiles at
    a new token count, cache conversions and module loads all happen before the timed rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    previous = math.inf
    for _ in range(_MAX_WARMUP_ROUNDS):
        sync(device)
        start = time.perf_counter()
        for a in args:
            fn(*a)
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= 0.9 * previous:
            break
        previous = elapsed


def _time_wall(
    fn: RopeFn, args: list[tuple], device: torch.device, repeats: int, min_round_s: float
) -> Timing:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    # Calibrate calls per round so a round outlasts timer and synchronization noise.
    calls = len(args)
    while True:
        sync(device)
        start = time.perf_counter()
        for i in range(calls):
            fn(*args[i % len(args)])
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_round_s or calls >= 1 << 16:
            break
        calls *= 2
    per_call = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for i in range(calls):
            fn(*args[i % len(args)])
        sync(device)
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return _percentiles(per_call)


def _time_graph(
    fn: RopeFn, args: list[tuple], device: torch.device, repeats: int, min_round_s: float
) -> Timing:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # capture needs a side stream; warm it up there as well
        for a in args:
            fn(*a)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for a in args:
            fn(*a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Replays per round so that a round lasts min_round_s.
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    one_ms = max(start.elapsed_time(end), 1e-3)
    replays = max(1, min(1000, math.ceil(min_round_s * 1e3 / one_ms)))
    for _ in range(3):
        graph.replay()
    per_call = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (replays * len(args)))
    return _percentiles(per_call)


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting read plus write."""
    device = torch.device(device)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    if device.type != "cuda":
        dst.copy_(src)  # first touch: page faults stay out of the timing
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        return 2 * src.nbytes / statistics.median(times)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / statistics.median(times)
