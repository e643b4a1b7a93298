"""The shape of a RoPE problem: what a model's attention layer hands to the kernel."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["DTYPE_NAMES", "RopeSpec", "mrope_stream_map", "parse_dtype"]

# Canonical names first; the short aliases are accepted wherever a dtype is parsed.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
}
_CANONICAL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

_KEY_RE = re.compile(
    r"^q(?P<num_heads>\d+)_kv(?P<num_kv_heads>\d+)_d(?P<head_size>\d+)_r(?P<rotary_dim>\d+)"
    r"_(?P<style>neox|gptj)_(?P<dtype>bfloat16|float16|float32)"
    r"(?:_mrope(?P<interleaved>i?)(?P<t>\d+)-(?P<h>\d+)-(?P<w>\d+))?$"
)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for ``value`` (``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``...).

    Raises:
        ValueError: ``value`` names no supported dtype.
    """
    if isinstance(value, torch.dtype):
        if value not in _CANONICAL:
            raise ValueError(
                f"dtype: expected one of {sorted(set(_CANONICAL.values()))}, got {value}"
            )
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_NAMES)}, got {value!r}")
    return DTYPE_NAMES[name]


def mrope_stream_map(section: tuple[int, int, int], interleaved: bool) -> tuple[int, ...]:
    """The position stream (0: time, 1: height, 2: width) each rotary frequency of a multimodal
    RoPE layout takes its angle from, as vLLM's ``MRotaryEmbedding`` lays the sections out.

    Chunked (Qwen2-VL, Qwen2.5-VL): the first ``section[0]`` frequencies take stream 0, the next
    ``section[1]`` stream 1, the last ``section[2]`` stream 2. Interleaved (Qwen3-VL,
    ``THWTHW...``): frequency ``j`` takes stream 1 when ``j % 3 == 1`` and ``j < 3 * section[1]``,
    stream 2 when ``j % 3 == 2`` and ``j < 3 * section[2]``, else stream 0 (so the time stream
    also takes every frequency past the interleaved part).

    Returns:
        One stream per frequency, ``sum(section)`` of them.
    """
    half = sum(section)
    if not interleaved:
        return tuple(s for s, count in enumerate(section) for _ in range(count))
    return tuple(
        1 if j % 3 == 1 and j < 3 * section[1] else 2 if j % 3 == 2 and j < 3 * section[2] else 0
        for j in range(half)
    )


@dataclass(frozen=True)
class RopeSpec:
    """Everything about a RoPE call that a kernel may specialize on, except the token count.

    Attributes:
        head_size: Elements per attention head (``D``).
        rotary_dim: Leading elements of each head that rotate (even, at most ``head_size``).
        num_heads: Query heads (``Hq``).
        num_kv_heads: Key heads (``Hk``); ``Hq`` is a multiple of it.
        is_neox: NeoX style pairs element ``i`` with ``i + rotary_dim/2``; GPT-J style pairs
            ``2i`` with ``2i+1``.
        dtype: Element type of query and key.
        mrope_section: Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): how many of the
            ``rotary_dim // 2`` frequencies take their angle from the time, height and width
            position streams (three non-negative ints summing to ``rotary_dim // 2``); None for
            plain RoPE. Positions are then ``[3, T]`` (or ``[T]``, text only).
        mrope_interleaved: The sections interleave ``THWTHW...`` (Qwen3-VL) instead of lying in
            contiguous chunks (:func:`mrope_stream_map`); only with ``mrope_section``.
    """

    head_size: int
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    is_neox: bool
    dtype: torch.dtype
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False

    def __post_init__(self) -> None:
        for name in ("head_size", "rotary_dim", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_size:
            raise ValueError(
                f"rotary_dim: expected an even number at most head_size={self.head_size}, "
                f"got {self.rotary_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, "
                f"got {self.num_kv_heads}"
            )
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "is_neox", bool(self.is_neox))
        self._check_mrope()

    def _check_mrope(self) -> None:
        section, interleaved = self.mrope_section, self.mrope_interleaved
        if not isinstance(interleaved, bool):
            raise ValueError(f"mrope_interleaved: expected a bool, got {interleaved!r}")
        if section is None:
            if interleaved:
                raise ValueError("mrope_interleaved: needs mrope_section")
            return
        if isinstance(section, (str, bytes)) or not hasattr(section, "__iter__"):
            raise ValueError(f"mrope_section: expected three ints, got {section!r}")
        section = tuple(section)
        if len(section) != 3 or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in section
        ):
            raise ValueError(f"mrope_section: expected three non-negative ints, got {section!r}")
        if sum(section) != self.rotary_dim // 2:
            raise ValueError(
                f"mrope_section: expected sections summing to rotary_dim // 2 = "
                f"{self.rotary_dim // 2}, got {list(section)}"
            )
        streams = mrope_stream_map(section, interleaved)
        counts = tuple(streams.count(s) for s in range(3))
        if counts != section:
            # The interleaved rule places section[1] and section[2] frequencies only when the
            # time section is the largest.
            raise ValueError(
                f"mrope_section: the interleaved layout of {list(section)} gives the streams "
                f"{list(counts)} frequencies, not {list(section)}"
            )
        object.__setattr__(self, "mrope_section", section)

    def __lt__(self, other: RopeSpec) -> bool:  # torch.dtype has no order: sort by key
        return self.key < other.key

    @property
    def is_mrope(self) -> bool:
        """Whether this is a multimodal RoPE spec (:attr:`mrope_section` set)."""
        return self.mrope_section is not None

    @property
    def mrope_streams(self) -> tuple[int, ...] | None:
        """Per rotary frequency (``rotary_dim // 2`` of them), the position stream it takes its
        angle from (:func:`mrope_stream_map`); None for plain RoPE."""
        if self.mrope_section is None:
            return None
        return mrope_stream_map(self.mrope_section, self.mrope_interleaved)

    @property
    def dtype_name(self) -> str:
        return _CANONICAL[self.dtype]

    @property
    def key(self) -> str:
        """Stable text form used in tuning tables, e.g. ``q32_kv8_d128_r128_neox_bfloat16``;
        multimodal specs add their sections, ``_mrope16-24-24`` (chunked) or ``_mropei24-20-20``
        (interleaved)."""
        style = "neox" if self.is_neox else "gptj"
        key = (
            f"q{self.num_heads}_kv{self.num_kv_heads}_d{self.head_size}_r{self.rotary_dim}"
            f"_{style}_{self.dtype_name}"
        )
        if self.mrope_section is not None:
            layout = "i" if self.mrope_interleaved else ""
            key += f"_mrope{layout}" + "-".join(str(s) for s in self.mrope_section)
        return key

    @classmethod
    def from_key(cls, key: str) -> RopeSpec:
        """Inverse of :attr:`key`.

        Raises:
            ValueError: ``key`` is not in the documented form.
        """
        match = _KEY_RE.match(key)
        if match is None:
            raise ValueError(
                "spec key: expected the form q<Hq>_kv<Hk>_d<D>_r<R>_<neox|gptj>_<dtype> "
                f"(then _mrope<T>-<H>-<W> or _mropei<T>-<H>-<W> for mRoPE), got {key!r}"
            )
        g = match.groupdict()
        section = None if g["t"] is None else (int(g["t"]), int(g["h"]), int(g["w"]))
        return cls(
            head_size=int(g["head_size"]),
            rotary_dim=int(g["rotary_dim"]),
            num_heads=int(g["num_heads"]),
            num_kv_heads=int(g["num_kv_heads"]),
            is_neox=g["style"] == "neox",
            dtype=DTYPE_NAMES[g["dtype"]],
            mrope_section=section,
            mrope_interleaved=g["interleaved"] == "i",
        )

    def bytes_moved(
        self,
        num_tokens: int,
        cache_dtype: torch.dtype = torch.float32,
        positions_dtype: torch.dtype = torch.int64,
        with_key: bool = True,
    ) -> int:
        """Fewest bytes a call must move through memory.

        Reads and writes the rotated part of every query (and key) head once, reads
        ``rotary_dim`` cos/sin values and one position per token (three for an mRoPE spec: its
        ``[3, T]`` positions).
        """
        elem = torch.empty((), dtype=self.dtype).element_size()
        heads = self.num_heads + (self.num_kv_heads if with_key else 0)
        cache_elem = torch.empty((), dtype=cache_dtype).element_size()
        pos_elem = torch.empty((), dtype=positions_dtype).element_size()
        return num_tokens * (
            2 * heads * self.rotary_dim * elem
            + self.rotary_dim * cache_elem
            + (3 if self.is_mrope else 1) * pos_elem
        )
