"""The shape of a RoPE problem: what a model's attention layer hands to the kernel."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["DTYPE_NAMES", "RopeSpec", "parse_dtype"]

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
    r"_(?P<style>neox|gptj)_(?P<dtype>bfloat16|float16|float32)$"
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
    """

    head_size: int
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    is_neox: bool
    dtype: torch.dtype

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

    def __lt__(self, other: RopeSpec) -> bool:  # torch.dtype has no order: sort by key
        return self.key < other.key

    @property
    def dtype_name(self) -> str:
        return _CANONICAL[self.dtype]

    @property
    def key(self) -> str:
        """Stable text form used in tuning tables, e.g. ``q32_kv8_d128_r128_neox_bfloat16``."""
        style = "neox" if self.is_neox else "gptj"
        return (
            f"q{self.num_heads}_kv{self.num_kv_heads}_d{self.head_size}_r{self.rotary_dim}"
            f"_{style}_{self.dtype_name}"
        )

    @classmethod
    def from_key(cls, key: str) -> RopeSpec:
        """Inverse of :attr:`key`.

        Raises:
            ValueError: ``key`` is not in the documented form.
        """
        match = _KEY_RE.match(key)
        if match is None:
            raise ValueError(
                "spec key: expected the form q<Hq>_kv<Hk>_d<D>_r<R>_<neox|gptj>_<dtype>, "
                f"got {key!r}"
            )
        g = match.groupdict()
        return cls(
            head_size=int(g["head_size"]),
            rotary_dim=int(g["rotary_dim"]),
            num_heads=int(g["num_heads"]),
            num_kv_heads=int(g["num_kv_heads"]),
            is_neox=g["style"] == "neox",
            dtype=DTYPE_NAMES[g["dtype"]],
        )

    def bytes_moved(
        self,
        num_tokens: int,
        cache_dtype: torch.dtype = torch.float32,
        positions_dtype: torch.dtype = torch.int64,
        with_key: bool = True,
    ) -> int:
        """Fewest bytes a call must move through memory.

        Reads and writes the rotated part of every query (and key) head once, reads one cos/sin
        row and one position per token.
        """
        elem = torch.empty((), dtype=self.dtype).element_size()
        heads = self.num_heads + (self.num_kv_heads if with_key else 0)
        cache_elem = torch.empty((), dtype=cache_dtype).element_size()
        pos_elem = torch.empty((), dtype=positions_dtype).element_size()
        return num_tokens * (
            2 * heads * self.rotary_dim * elem + self.rotary_dim * cache_elem + pos_elem
        )
