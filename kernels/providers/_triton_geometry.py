"""How the Triton kernel (:mod:`._triton_kernel`) lays a call out: head rows, head blocks,
programs and tiles.

The one home of that arithmetic: the launcher's grid and constexprs, the config restrictions
and defaults, the performance model's features and ``benchmarks/roofline.py`` read it here.
Plain Python on ints, so that it costs nothing to import and gives the same numbers
everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._spec import RopeSpec

__all__ = ["TritonGeometry", "next_pow2", "padded_row"]


def next_pow2(n: int) -> int:
    """The smallest power of two at or above ``n`` (1 for ``n <= 1``), as
    ``triton.next_power_of_2`` for positive ``n``."""
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_row(spec: RopeSpec) -> int:
    """Elements of a head's rotated slice as the kernel's tiles hold it: each half padded to a
    power of two (``tl.arange`` needs one), so ``2 * next_pow2(rotary_dim // 2)``."""
    return 2 * next_pow2(spec.rotary_dim // 2)


@dataclass(frozen=True)
class TritonGeometry:
    """What a Triton config does with a spec, for any token count.

    A program owns ``block_t`` tokens. A token block's query head blocks and then its key head
    blocks (``block_h`` heads each; the last block of each tensor may be partial) are numbered
    as one sequence of :attr:`head_blocks`, and its :attr:`grid_h` programs share them: program
    ``p`` walks blocks ``p, p + head_split, p + 2 * head_split, ...`` (:meth:`blocks_of`).

    Build it with :meth:`of` from a config (``block_t``, ``block_h`` and ``head_split`` are read;
    other keys are ignored), or directly. Token counts enter through the methods.

    Attributes:
        spec: The spec.
        block_t: Tokens per program (``BLOCK_T``).
        block_h: Heads per step (``BLOCK_H``).
        head_split: Programs a token block's head blocks are dealt to (``HEAD_SPLIT``).
        has_key: Whether the call rotates a key tensor (without one, only query blocks).
        rot_half: ``rotary_dim // 2`` (``ROT_HALF``).
        half_pad: ``rot_half`` rounded up to a power of two (``HALF_PAD``).
        row: Elements of one head's rotated slice in a tile, padding included
            (:func:`padded_row`).
        q_blocks: Query head blocks.
        k_blocks: Key head blocks (0 without a key).
        head_blocks: ``q_blocks + k_blocks``.
        grid_h: Programs per token block: ``head_split``, but never more than there are head
            blocks (none idle).
        steps: Head blocks the busiest program walks, one after the other.
        full_split: The power of two at or above :attr:`head_blocks`: the smallest
            ``head_split`` of this form that gives every head block its own program (any
            larger one launches the same grid).
        tile: Elements of one step's tile (``block_t * block_h * row``).
    """

    spec: RopeSpec
    block_t: int
    block_h: int
    head_split: int
    has_key: bool = True
    rot_half: int = field(init=False)
    half_pad: int = field(init=False)
    row: int = field(init=False)
    q_blocks: int = field(init=False)
    k_blocks: int = field(init=False)
    head_blocks: int = field(init=False)
    grid_h: int = field(init=False)
    steps: int = field(init=False)
    full_split: int = field(init=False)
    tile: int = field(init=False)

    def __post_init__(self) -> None:
        spec, block_h = self.spec, self.block_h
        q_blocks = _cdiv(spec.num_heads, block_h)
        k_blocks = _cdiv(spec.num_kv_heads, block_h) if self.has_key else 0
        head_blocks = q_blocks + k_blocks
        row = padded_row(spec)
        derived = {
            "rot_half": spec.rotary_dim // 2,
            "half_pad": row // 2,
            "row": row,
            "q_blocks": q_blocks,
            "k_blocks": k_blocks,
            "head_blocks": head_blocks,
            "grid_h": min(self.head_split, head_blocks),
            "steps": _cdiv(head_blocks, self.head_split),
            "full_split": next_pow2(head_blocks),
            "tile": self.block_t * block_h * row,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(
        cls, spec: RopeSpec, config: Mapping[str, Any], *, has_key: bool = True
    ) -> TritonGeometry:
        """The geometry of ``config`` (its ``block_t``, ``block_h``, ``head_split``) for
        ``spec``. Raises KeyError when one of those is missing."""
        return cls(spec, config["block_t"], config["block_h"], config["head_split"], has_key)

    # -- per token count -----------------------------------------------------------------------

    def token_blocks(self, num_tokens: int) -> int:
        """Token blocks of a call with ``num_tokens`` tokens (the grid's first dimension)."""
        return _cdiv(num_tokens, self.block_t)

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """The launch grid: (token blocks, programs per token block)."""
        return self.token_blocks(num_tokens), self.grid_h

    def programs(self, num_tokens: int) -> int:
        """Programs one launch starts."""
        return self.token_blocks(num_tokens) * self.grid_h

    # -- per tile ------------------------------------------------------------------------------

    def elems_per_thread(self, num_warps: int) -> float:
        """Tile elements each of the ``32 * num_warps`` threads holds (per live value)."""
        return self.tile / (32 * num_warps)

    @property
    def lane_use(self) -> float:
        """Rotated elements over the elements the tiles span (padding, partial head blocks)."""
        heads = self.spec.num_heads + (self.spec.num_kv_heads if self.has_key else 0)
        return heads * self.spec.rotary_dim / (self.head_blocks * self.block_h * self.row)

    @property
    def heads_per_program(self) -> float:
        """Heads a program rotates per cos/sin row it loads (on average over programs)."""
        return self.head_blocks * self.block_h / self.grid_h

    def blocks_of(self, program: int) -> tuple[tuple[str, int], ...]:
        """The head blocks program ``program`` (``0 <= program < grid_h``) of a token block
        walks, in order, as ``("q" or "k", first head)``.

        Raises:
            ValueError: ``program`` is outside the grid.
        """
        if not 0 <= program < self.grid_h:
            raise ValueError(f"program: expected 0 <= program < {self.grid_h}, got {program}")
        return tuple(
            ("q", i * self.block_h)
            if i < self.q_blocks
            else ("k", (i - self.q_blocks) * self.block_h)
            for i in range(program, self.head_blocks, self.head_split)
        )
