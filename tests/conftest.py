"""Shared test setup and fixtures.

Without CUDA, Triton kernels run under the interpreter on the CPU; the variable must be set
before any kernel is defined, so it is set here, at collection start. Test modules import the
shared constants below with ``from conftest import ...``.
"""

import os
import platform
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import RopeSpec  # noqa: E402  (after TRITON_INTERPRET is set)
from kernels.providers import register_provider, unregister_provider  # noqa: E402
from kernels.table import device_table_name  # noqa: E402

# The repository root (scripts in benchmarks/, subprocesses that import the tree).
ROOT = Path(__file__).resolve().parent.parent

# The smallest spec the tuner tests run: 16-wide heads, 2 query heads, 1 key head, float32
# (the Triton interpreter has no bf16 math).
TINY = RopeSpec(16, 16, 2, 1, True, torch.float32)
# A GPT-J style, grouped-query spec with partial rotary, in bf16 (stored; math in float32).
TINY_GPTJ = RopeSpec(32, 16, 4, 2, False, torch.bfloat16)
# time_rope arguments for a quick CPU measurement: few rounds, no minimum round length.
QUICK = {"repeats": 3, "min_round_s": 0.0}
# The table file the tuner writes on this machine's CPU (``CPU <machine>.json``).
CPU_TABLE = device_table_name(f"CPU {platform.machine()}")


@pytest.fixture
def registered():
    """Register providers for one test: ``registered(provider)`` returns it; all are
    unregistered afterwards."""
    names = []

    def register(provider):
        register_provider(provider)
        names.append(provider.name)
        return provider

    yield register
    for name in names:
        unregister_provider(name)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to, root included (chmod, or the immutable flag as root)."""
    import shutil
    import stat
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield path
        path.chmod(stat.S_IRWXU)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", path], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no directory is read-only here")
    yield path
    subprocess.run([chattr, "-i", path], check=True)
