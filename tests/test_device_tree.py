"""The working tree travels to the GPU machine with every device call, together with what the
call carries, at most 64 MiB in all; a tree over that makes the device refuse the call before
anything runs. The first set-up call carries ``.gpu/a`` (vLLM's compiled op library, built by
``../shared/gpu/prepare.sh``) with the tuning journals parked (``benchmarks/device/park.sh``);
the second carries ``.gpu/b`` and ``.tune/`` with the whole tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEVICE_TREE_LIMIT = 64 << 20  # the device tool's limit on tree plus carried paths
PART_A_BYTES = 55_930_000  # .gpu/a as prepare.sh builds it, in disk blocks; its own when present
PART_B_BYTES = 37_700_000  # .gpu/b likewise
TUNE_BYTES = 3_000_000  # .tune/: a journal, a table and FlashInfer's module, compressed
HEADROOM = 300_000  # files written between the check and the call (logs, a small result)
PARKED = "benchmarks/results/*.journal.xz"  # what park.sh moves out for the first call
BLOCK = 4096  # count whole disk blocks: the stricter count; the tool does not document its own


def _on_disk(path: Path) -> int:
    return -(-path.stat().st_size // BLOCK) * BLOCK if path.is_file() else 0


def _tree_files() -> list[Path]:
    """The files a device call copies: tracked ones and untracked ones git does not ignore."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.decode().split("\0") if name]


def _part_bytes(part: str, default: int) -> int:
    directory = REPO / ".gpu" / part
    if directory.is_dir():
        return sum(_on_disk(p) for p in directory.rglob("*"))
    return default


def _check(files: list[Path], room: int, call: str) -> None:
    tree = sum(_on_disk(p) for p in files)
    largest = sorted(files, key=_on_disk)[-3:]
    assert tree <= room, (
        f"the working tree is {tree / 1e6:.2f} MB, over the {room / 1e6:.2f} MB the {call} leaves "
        "it within the device's 64 MiB; largest: "
        + ", ".join(str(p.relative_to(REPO)) for p in reversed(largest))
        + ". Recompress journals (xz -9e) or slim benchmarks/results/."
    )


def test_the_tree_leaves_room_for_the_first_gpu_setup_call():
    parked = set(REPO.glob(PARKED))
    files = [p for p in _tree_files() if p not in parked]
    room = DEVICE_TREE_LIMIT - _part_bytes("a", PART_A_BYTES) - HEADROOM
    _check(files, room, "first set-up call (journals parked)")


def test_the_tree_leaves_room_for_the_second_gpu_setup_call():
    room = DEVICE_TREE_LIMIT - _part_bytes("b", PART_B_BYTES) - TUNE_BYTES - HEADROOM
    _check(_tree_files(), room, "second set-up call (with .tune/)")
