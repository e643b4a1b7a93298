"""Installing: shipped tables and ``py.typed`` are found after a plain, non-editable install
(configs/ -> kernels/configs); the runtime works without the tuner's libraries, and the tuner
without them names the extra to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kernels
from kernels.table import (
    CONFIG_DIR_ENV,
    SCHEMA_VERSION,
    device_metadata,
    device_table_name,
    write_table,
)

REPO = Path(__file__).resolve().parent.parent
# Not part of a source distribution: build outputs, environments, caches, VCS data.
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".gpu",
)
SPEC_KEY = "q8_kv1_d64_r32_gptj_float32"


@pytest.mark.slow
def test_shipped_table_found_after_plain_install(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=IGNORE)
    # The fixture table goes into the *copy's* configs/, never the repository's.
    table_name = device_table_name(device_metadata("cpu")["device_name"])
    entry = {"provider": "torch", "config": {}, "median_us": 3.5, "providers_us": {"torch": 3.5}}
    table = {
        "schema_version": SCHEMA_VERSION,
        "metadata": device_metadata("cpu"),
        "entries": {"graph": {SPEC_KEY: {"16": entry}}},
    }
    write_table(source / "configs" / table_name, table)

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (target / "kernels" / "configs" / table_name).is_file()
    assert (target / "kernels" / "py.typed").is_file()

    check = textwrap.dedent(f"""
        import warnings
        from pathlib import Path
        import kernels
        from kernels.table import shipped_config_dir
        assert Path(kernels.__file__).is_relative_to({str(target)!r}), kernels.__file__
        shipped = shipped_config_dir()
        assert (shipped / {table_name!r}).is_file(), sorted(p.name for p in shipped.iterdir())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rope = kernels.select_rope(64, 32, 8, 1, False, "float32", "cpu")
        explained = rope.explain(16)
        assert rope.source == shipped / {table_name!r}, rope.source
        assert explained.provider == "torch" and explained.spec_key == {SPEC_KEY!r}, explained
        print("found", rope.source)
    """)
    env = {k: v for k, v in os.environ.items() if k not in (CONFIG_DIR_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "empty-config")  # no user table in the way
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=elsewhere, env=env,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert str(target / "kernels" / "configs" / table_name) in run.stdout


# -- the runtime without the tuner's libraries ------------------------------------------------

TUNER_ONLY = ("optuna", "matplotlib", "tqdm")
# Run first in a fresh interpreter: those modules cannot be imported, as in an environment
# where only `pip install rope-autotune` (no `tune` extra) ran.
BLOCK_TUNER_LIBRARIES = textwrap.dedent(f"""
    import sys

    class BlockTunerLibraries:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {TUNER_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, BlockTunerLibraries())
""")


def _run_without_tuner_libraries(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CONFIG_DIR_ENV}
    env["PYTHONPATH"] = str(REPO)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "empty-config")
    env.setdefault("TRITON_INTERPRET", "1")
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TUNER_LIBRARIES + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_runtime_works_without_the_tuner_libraries(tmp_path):
    run = _run_without_tuner_libraries(
        f"""
        import warnings
        import torch
        import kernels
        assert kernels.__file__.startswith({str(REPO)!r}), kernels.__file__
        warnings.simplefilter("ignore")  # no table for this spec: the fallback warning
        rope = kernels.select_rope(64, 32, 4, 2, True, torch.float32, "cpu")
        positions = torch.arange(5)
        query, key = torch.randn(5, 4 * 64), torch.randn(5, 2 * 64)
        before = query.clone()
        rope(positions, query, key, kernels.cos_sin_cache(16, 32))
        assert not torch.equal(query, before)
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {TUNER_ONLY!r})
        assert not loaded, loaded
        print("runtime ok")
        """,
        tmp_path,
    )
    assert run.returncode == 0 and "runtime ok" in run.stdout, run.stdout + run.stderr[-3000:]


@pytest.mark.slow
def test_tuner_without_its_libraries_names_the_tune_extra(tmp_path):
    run = _run_without_tuner_libraries(
        """
        import runpy
        sys.argv = ["autotune", "--help"]
        runpy.run_module("autotune", run_name="__main__", alter_sys=True)
        """,
        tmp_path,
    )
    assert run.returncode != 0, run.stdout
    assert "rope-autotune[tune]" in run.stdout + run.stderr, run.stdout + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_package_is_marked_apart_from_hugging_faces_kernels():
    # Hugging Face's kernel hub installs a top-level `kernels` too; the tuner checks this mark.
    assert kernels.__rope_autotune__ is True
