"""Test-side RoPE oracle, written from the math and independent of ``kernels.testing``.

Also builds the test inputs: every layout the contract allows (plain, head-split, column slices
of a fused qkv tensor, head-padded buffers, ``[B, S, ...]``), together with the full buffers
they live in, so a test can check both the rotated region (against the float64 oracle) and
everything else (bit-identical) after an in-place call.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "LAYOUTS",
    "Case",
    "Inputs",
    "build_inputs",
    "check_outputs",
    "covering_matrix",
    "make_cache",
    "rope64",
    "seed_of",
    "tight_tolerance",
    "views_of",
    "with_",
]

# Every way a query/key tensor may reach the op (see Case.layout).
LAYOUTS = (
    "flat",  # [T, H*D], contiguous
    "heads",  # [T, H, D], contiguous
    "qkv",  # q and k are column slices of a fused [T, (Hq+2Hk)*D] tensor
    "qkv_heads",  # q and k are head slices of a fused [T, Hq+2Hk, D] tensor
    "padded",  # [T, H, Dpad] buffer sliced to [..., :D]
    "bs_flat",  # [B, S, H*D], positions [B, S]
    "bs_heads",  # [B, S, H, D], positions [B, S]
    "bs_qkv",  # column slices of a fused [B, S, (Hq+2Hk)*D], positions [B, S]
    "bs_padded",  # [B, S, H, Dpad] sliced to [..., :D], positions [B, S]
)
HEAD_PAD = 16  # extra elements per head in the padded layouts


def seed_of(text: str) -> int:
    """A stable seed from a test id: fresh inputs per test, reproducible per test."""
    return zlib.crc32(text.encode())


def rope64(
    x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, is_neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``x`` out of place in float64, straight from the definition.

    Args:
        x: ``[T, H, D]`` of any float dtype.
        positions: ``T`` integer positions, any shape.
        cache: ``[max_position, R]``: ``cos`` of pair ``i`` in column ``i``, ``sin`` in column
            ``R/2 + i``. Used as given (upcast), not assumed to be a real rotation.
        is_neox: Pair ``i`` holds elements ``(i, i + R/2)`` (NeoX) or ``(2i, 2i + 1)`` (GPT-J).

    Returns:
        ``(out, magnitude)``, both float64 ``[T, H, D]``: the rotated tensor (elements at and
        past ``R`` copied) and, per output element, ``|a*cos| + |b*sin|``: the size of the terms
        it sums, for bounding providers that do arithmetic in the element type.
    """
    half = cache.shape[1] // 2
    pair = torch.arange(half)
    first, second = (pair, pair + half) if is_neox else (2 * pair, 2 * pair + 1)
    rows = cache.double()[positions.reshape(-1).long()]  # [T, R]
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    x = x.double()
    a, b = x[..., first], x[..., second]
    out, magnitude = x.clone(), torch.zeros_like(x)
    out[..., first] = a * cos - b * sin
    out[..., second] = b * cos + a * sin
    magnitude[..., first] = (a * cos).abs() + (b * sin).abs()
    magnitude[..., second] = (b * cos).abs() + (a * sin).abs()
    return out, magnitude


def make_cache(
    kind: str,
    max_position: int,
    rotary_dim: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    base: float = 10000.0,
) -> torch.Tensor:
    """A ``[max_position, rotary_dim]`` cos/sin cache (cos half, then sin half), on the CPU.

    Kinds:
        ``rope``: the standard one, ``cos(p * base**(-2i/R))`` and ``sin(...)``.
        ``random``: independent uniform values in [-1, 1]; the op uses the cache as given, and
            no (cos, sin) pair is near the identity, so a skipped element cannot pass.
        ``exact``: each (cos, sin) is one of (-1, 0), (0, 1), (0, -1): a quarter or half turn,
            so every output is an input, negated or not, and providers must match bit for bit.
    """
    half = rotary_dim // 2
    if kind == "rope":
        inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rotary_dim)
        angle = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cache = torch.cat((angle.cos(), angle.sin()), dim=1)
    elif kind == "random":
        cache = torch.rand(max_position, rotary_dim, dtype=torch.float64, generator=generator)
        cache = 2 * cache - 1
    elif kind == "exact":
        turns = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
        pick = turns[torch.randint(0, 3, (max_position, half), generator=generator)]
        cache = torch.cat((pick[..., 0], pick[..., 1]), dim=1)
    else:
        raise ValueError(f"cache kind: {kind!r}")
    return cache.to(dtype)


@dataclass(frozen=True)
class Case:
    """One RoPE call to test.

    Attributes:
        num_kv_heads: Key heads, or None for a call without key.
        layout: One of :data:`LAYOUTS`.
        cache_dtype: ``"float32"`` or ``"same"`` (the query's dtype).
        cache_kind: See :func:`make_cache`.
        near_max: Positions drawn from the last few rows of the cache, ``max_position - 1``
            included.
    """

    head_size: int = 128
    rotary_dim: int = 128
    num_heads: int = 8
    num_kv_heads: int | None = 2
    is_neox: bool = True
    dtype: torch.dtype = torch.bfloat16
    layout: str = "flat"
    num_tokens: int = 7
    positions_dtype: torch.dtype = torch.int64
    cache_dtype: str = "float32"
    cache_kind: str = "random"
    near_max: bool = False
    max_position: int = 4096

    @property
    def id(self) -> str:
        style = "neox" if self.is_neox else "gptj"
        kv = "nokey" if self.num_kv_heads is None else f"kv{self.num_kv_heads}"
        dtype = str(self.dtype).removeprefix("torch.")
        pos = str(self.positions_dtype).removeprefix("torch.")
        return (
            f"d{self.head_size}r{self.rotary_dim}-q{self.num_heads}{kv}-{style}-{dtype}-"
            f"{self.layout}-T{self.num_tokens}-{pos}-cache_{self.cache_dtype}_{self.cache_kind}"
            + ("-nearmax" if self.near_max else "")
        )

    @property
    def batch_shape(self) -> tuple[int, int]:
        """``(B, S)`` for the ``bs_*`` layouts: more than one batch row whenever possible."""
        for batch in (3, 2, 5, 7):
            if self.num_tokens % batch == 0 and self.num_tokens > batch:
                return batch, self.num_tokens // batch
        return 1, self.num_tokens


@dataclass
class Inputs:
    """Tensors for one call, plus what a check needs afterwards.

    ``buffers`` are the whole tensors ``query`` and ``key`` are views of; ``before`` their
    copies taken at build time; ``expected`` float64 copies with the oracle's values in the
    rotated region; ``rotated`` boolean masks of that region; ``magnitude`` the oracle's term
    sizes there (zero elsewhere).
    """

    positions: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor | None
    cos_sin_cache: torch.Tensor
    buffers: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    expected: dict[str, torch.Tensor] = field(default_factory=dict)
    rotated: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)


def _allocate(case: Case, make: Callable[[tuple[int, ...]], torch.Tensor]) -> dict:
    """The buffers of ``case``'s layout, each made by ``make(shape)``."""
    T, D = case.num_tokens, case.head_size
    Hq, Hk = case.num_heads, case.num_kv_heads
    fused_heads = Hq + 2 * (Hk or 1)  # without key, the k and v columns must stay untouched
    B, S = case.batch_shape
    tokens = (B, S) if case.layout.startswith("bs_") else (T,)
    kind = case.layout.removeprefix("bs_")
    if kind in ("qkv", "qkv_heads"):
        shape = (*tokens, fused_heads * D) if kind == "qkv" else (*tokens, fused_heads, D)
        return {"qkv": make(shape)}
    shapes = {
        "flat": lambda h: (*tokens, h * D),
        "heads": lambda h: (*tokens, h, D),
        "padded": lambda h: (*tokens, h, D + HEAD_PAD),
    }[kind]
    buffers = {"query": make(shapes(Hq))}
    if Hk is not None:
        buffers["key"] = make(shapes(Hk))
    return buffers


def views_of(case: Case, buffers: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(query, key)`` as the op receives them, viewed from ``buffers``."""
    D, Hq, Hk = case.head_size, case.num_heads, case.num_kv_heads
    kind = case.layout.removeprefix("bs_")
    if kind == "qkv":
        qkv = buffers["qkv"]
        key = None if Hk is None else qkv[..., Hq * D : (Hq + Hk) * D]
        return qkv[..., : Hq * D], key
    if kind == "qkv_heads":
        qkv = buffers["qkv"]
        return qkv[:, :Hq], (None if Hk is None else qkv[:, Hq : Hq + Hk])
    if kind == "padded":
        key = buffers.get("key")
        return buffers["query"][..., :D], (None if key is None else key[..., :D])
    return buffers["query"], buffers.get("key")


def build_inputs(case: Case, seed: int, device: torch.device | str = "cpu") -> Inputs:
    """Random inputs for ``case`` on ``device`` with the oracle's expectations (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    T, D, R = case.num_tokens, case.head_size, case.rotary_dim

    def make(shape):
        # Exact cache: inputs bounded away from zero make every output differ from its input.
        if case.cache_kind == "exact":
            sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
            return (sign * (0.5 + 1.5 * torch.rand(shape, generator=gen))).to(case.dtype)
        return torch.randn(shape, generator=gen).to(case.dtype)

    cache_dtype = torch.float32 if case.cache_dtype == "float32" else case.dtype
    cache = make_cache(case.cache_kind, case.max_position, R, cache_dtype, gen)
    if case.near_max:
        low = case.max_position - 8
        positions = torch.randint(low, case.max_position, (T,), generator=gen)
        positions[T // 2] = case.max_position - 1
    else:
        positions = torch.randint(0, case.max_position, (T,), generator=gen)
    positions = positions.to(case.positions_dtype)
    if case.layout.startswith("bs_"):
        positions = positions.reshape(case.batch_shape)

    buffers = _allocate(case, make)
    inputs = Inputs(positions, *views_of(case, buffers), cache, buffers)
    inputs.before = {name: b.clone() for name, b in buffers.items()}
    inputs.expected = {name: b.double() for name, b in buffers.items()}
    inputs.rotated = {name: torch.zeros(b.shape, dtype=torch.bool) for name, b in buffers.items()}
    inputs.magnitude = {
        name: torch.zeros(b.shape, dtype=torch.float64) for name, b in buffers.items()
    }
    exp_views = views_of(case, inputs.expected)
    mask_views = views_of(case, inputs.rotated)
    mag_views = views_of(case, inputs.magnitude)
    for exp, mask, mag in zip(exp_views, mask_views, mag_views, strict=True):
        if exp is None:
            continue
        exp_thd, mag_thd = exp.view(T, -1, D), mag.view(T, -1, D)
        out, magnitude = rope64(exp_thd, positions, cache, case.is_neox)
        exp_thd[..., :R] = out[..., :R]
        mag_thd[..., :R] = magnitude[..., :R]
        mask.view(T, -1, D)[..., :R] = True

    if torch.device(device).type != "cpu":
        buffers = {name: b.to(device) for name, b in buffers.items()}
        inputs.buffers = buffers
        inputs.query, inputs.key = views_of(case, buffers)
        inputs.positions = positions.to(device)
        inputs.cos_sin_cache = cache.to(device)
    return inputs


def tight_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for a provider that computes in float32 and rounds once.

    One rounding to ``dtype`` is at most half its epsilon, relative; ``rtol`` allows twice that
    (one epsilon) and ``atol`` float32 arithmetic on O(1) values.
    """
    return 1e-5, torch.finfo(dtype).eps


def check_outputs(inputs: Inputs, dtype: torch.dtype, arith_ulps: float = 0.0) -> None:
    """Assert the call did its job: the rotated region matches the oracle, the rest is untouched.

    Args:
        inputs: From :func:`build_inputs`, after the provider ran on them.
        dtype: Element type of query and key.
        arith_ulps: Extra error allowed, in epsilons of ``dtype`` times the size of the terms
            summed: 0 for providers that compute in float32 (ours), about 2 for one that
            multiplies and subtracts in the element type.
    """
    atol, rtol = tight_tolerance(dtype)
    for name, buffer in inputs.buffers.items():
        out = buffer.cpu()
        before, mask = inputs.before[name], inputs.rotated[name]
        # Bit for bit outside the rotated region: the tail of each head, v columns, padding.
        untouched_ok = torch.equal(out[~mask].view(torch.uint8), before[~mask].view(torch.uint8))
        assert untouched_ok, f"{name}: elements outside the rotated region changed"
        got, want = out[mask].double(), inputs.expected[name][mask]
        bound = atol + rtol * want.abs() + arith_ulps * rtol * inputs.magnitude[name][mask]
        err = (got - want).abs()
        bad = ~(err <= bound)  # NaN lands in bad
        if bool(bad.any()):
            where = mask.nonzero()[int(bad.nonzero()[0])].tolist()
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {bad.numel()} rotated elements off for {dtype} "
                f"(first at {where}: got {got[bad][0].item()}, want {want[bad][0].item()}, "
                f"max error {err.nan_to_num(float('inf')).max().item():.3g})"
            )


def covering_matrix(seed: int = 0, repeats: int = 2) -> list[Case]:
    """The CPU/GPU test matrix: every (head_size, rotary_dim) with both styles, ``repeats``
    times, and every other dimension assigned from a shuffled cycle of its values, so each value
    of each dimension appears at least ``len(cases) // len(values)`` times in varied company."""
    rotary = [
        (64, 64),
        (80, 80),
        (128, 128),
        (256, 256),
        (128, 32),
        (256, 64),
        (80, 32),
        (96, 24),  # rotary_dim / 2 = 12, not a power of two
        (64, 16),
    ]
    base = [(d, r, neox) for d, r in rotary for neox in (True, False)] * repeats
    others = {
        "heads": [(8, 2), (4, 4), (12, 4), (6, None), (16, 1), (3, None)],
        "dtype": [torch.float16, torch.bfloat16, torch.float32],
        "layout": list(LAYOUTS),
        "num_tokens": [1, 7, 33],
        "positions_dtype": [torch.int32, torch.int64],
        "cache_dtype": ["float32", "same"],
        "cache": [("random", False), ("rope", False), ("rope", True), ("exact", False)],
    }
    rng = random.Random(seed)
    picks = {}
    for name, values in others.items():
        order = list(range(len(base)))
        rng.shuffle(order)
        picks[name] = [values[i % len(values)] for i in order]
    cases = []
    for i, (d, r, neox) in enumerate(base):
        hq, hk = picks["heads"][i]
        kind, near_max = picks["cache"][i]
        cases.append(
            Case(
                head_size=d,
                rotary_dim=r,
                num_heads=hq,
                num_kv_heads=hk,
                is_neox=neox,
                dtype=picks["dtype"][i],
                layout=picks["layout"][i],
                num_tokens=picks["num_tokens"][i],
                positions_dtype=picks["positions_dtype"][i],
                cache_dtype=picks["cache_dtype"][i],
                cache_kind=kind,
                near_max=near_max,
            )
        )
    return cases


def with_(case: Case, **changes) -> Case:
    """``case`` with some fields changed."""
    return replace(case, **changes)
