"""The Triton geometry: its numbers by hand on one case, the launcher's actual grid, and which
heads each program of the kernel really rotates (on the GPU, else under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from kernels import RopeSpec, get_provider
from kernels.providers import TritonGeometry, TritonLauncher
from kernels.providers._triton_kernel import rope_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Partial rotary (12 rotated pairs, padded to 16) and key heads that blocks of 2 or 4 do not tile.
GQA = RopeSpec(64, 24, 6, 3, False, torch.float32)


def test_the_numbers_of_one_case_by_hand():
    g = TritonGeometry.of(GQA, {"block_t": 4, "block_h": 4, "head_split": 3, "num_warps": 2})
    assert (g.rot_half, g.half_pad, g.row) == (12, 16, 32)
    assert (g.q_blocks, g.k_blocks, g.head_blocks, g.grid_h) == (2, 1, 3, 3)
    assert (g.steps, g.full_split, g.tile) == (1, 4, 4 * 4 * 32)
    assert g.grid(7) == (2, 3) and g.programs(7) == 6 and g.token_blocks(8) == 2
    assert g.elems_per_thread(2) == 512 / 64
    assert g.lane_use == 9 * 24 / (3 * 4 * 32)
    assert g.heads_per_program == 3 * 4 / 3
    assert g.blocks_of(0) == (("q", 0),) and g.blocks_of(2) == (("k", 0),)
    keyless = TritonGeometry(GQA, 4, 4, 3, has_key=False)
    assert (keyless.head_blocks, keyless.grid_h, keyless.lane_use) == (2, 2, 6 * 24 / (2 * 4 * 32))
    with pytest.raises(ValueError, match="program"):
        keyless.blocks_of(2)


@pytest.mark.parametrize("split", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("has_key", [True, False])
def test_programs_share_every_head_block_once(split, has_key):
    g = TritonGeometry(GQA, 1, 2, split, has_key=has_key)
    walked = [b for p in range(g.grid_h) for b in g.blocks_of(p)]
    heads = [("q", h) for h in range(0, 6, 2)] + ([("k", h) for h in range(0, 3, 2)] * has_key)
    assert sorted(walked) == sorted(heads)
    assert max(len(g.blocks_of(p)) for p in range(g.grid_h)) == g.steps


class _GridRecorder:
    """``rope_kernel`` whose launches are recorded, optionally on a smaller head grid."""

    def __init__(self, grid_h: int | None = None) -> None:
        self.grids: list[tuple[int, int]] = []
        self.grid_h = grid_h

    def __getitem__(self, grid):
        self.grids.append(grid)
        if self.grid_h is not None:
            grid = (grid[0], self.grid_h)
        return rope_kernel[grid]


def _inputs(spec: RopeSpec, num_tokens: int, has_key: bool):
    gen = torch.Generator().manual_seed(0)
    d = spec.head_size
    positions = torch.randint(0, 16, (num_tokens,), generator=gen)
    query = torch.randn(num_tokens, spec.num_heads, d, generator=gen, dtype=spec.dtype)
    key = torch.randn(num_tokens, spec.num_kv_heads, d, generator=gen, dtype=spec.dtype)
    cache = torch.randn(16, spec.rotary_dim, generator=gen)
    keyed = key.to(DEVICE) if has_key else None
    return positions.to(DEVICE), query.to(DEVICE), keyed, cache.to(DEVICE)


CONFIGS = [
    {"block_t": 1, "block_h": 2, "head_split": 2, "num_warps": 1, "num_stages": 1},
    {"block_t": 4, "block_h": 1, "head_split": 16, "num_warps": 1, "num_stages": 1},
    {"block_t": 2, "block_h": 4, "head_split": 1, "num_warps": 2, "num_stages": 1},
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("has_key", [True, False])
def test_the_launcher_launches_the_geometrys_grid(config, has_key):
    recorder = _GridRecorder()
    launcher = TritonLauncher(GQA, config, kernel=recorder, fast=False)
    for num_tokens in (1, 5):
        launcher(*_inputs(GQA, num_tokens, has_key))
        geometry = TritonGeometry.of(GQA, config, has_key=has_key)
        assert recorder.grids[-1] == geometry.grid(num_tokens)
        assert launcher.grid(num_tokens, has_key) == geometry.grid(num_tokens)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=str)
def test_each_program_rotates_the_heads_the_geometry_names(config):
    """Launching only the first ``p + 1`` programs of each token block rotates exactly the
    head blocks the geometry gives programs ``0..p``."""
    geometry = TritonGeometry.of(GQA, config)
    get_provider("triton").check_config(GQA, config)  # a config the provider would run
    heads = {"q": GQA.num_heads, "k": GQA.num_kv_heads}
    positions, query, key, cache = _inputs(GQA, 3, True)
    for program in range(geometry.grid_h):
        q, k = query.clone(), key.clone()
        launcher = TritonLauncher(GQA, config, kernel=_GridRecorder(program + 1), fast=False)
        launcher(positions, q, k, cache)
        rotated = {
            (name, h)
            for name, new, old in (("q", q, query), ("k", k, key))
            for h in range(heads[name])
            if not torch.equal(new[:, h], old[:, h])
        }
        expected = {
            (name, first + i)
            for p in range(program + 1)
            for name, first in geometry.blocks_of(p)
            for i in range(geometry.block_h)
            if first + i < heads[name]
        }
        assert rotated == expected
