"""Shipped tables are found after a plain, non-editable install (configs/ -> kernels/configs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
