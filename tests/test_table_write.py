"""Writing tables: concurrent writers lose nothing, merges keep every valid entry and never
delete an unreadable file, dead writers' temporary files are cleared, the pre-flight names a
bad target, and the library leaves the process umask alone."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import entry

from kernels import RopeSpec, RopeTableWarning, provider_names
from kernels.table import (
    SCHEMA_VERSION,
    OutputDir,
    TableError,
    check_output_dir,
    check_table_target,
    device_table_name,
    merge_into_table,
    read_table,
    write_atomically,
    write_table,
)

DEVICE = "Test GPU"
FILE = device_table_name(DEVICE)
SPECS = [RopeSpec(64, 32, h, 1, True, torch.bfloat16).key for h in (1, 2, 4, 8, 16, 32)]
TRITON = {"block_t": 1, "block_h": 1, "head_split": 1, "num_warps": 4, "num_stages": 1}


def table(graph: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": {"device_name": DEVICE, "versions": {}},
        "entries": {"graph": graph, "eager": {}},
    }


# -- concurrent writers ----------------------------------------------------------------------


def _writer(args: tuple[str, int, int]) -> None:
    """One tuner process: merges its own spec, one bucket at a time."""
    directory, index, buckets = args
    for bucket in range(1, buckets + 1):
        merge_into_table(
            Path(directory) / FILE,
            table({SPECS[index]: {str(bucket): entry(median=float(index + bucket))}}),
            provider_names(),
        )


@pytest.mark.slow
def test_concurrent_writers_of_different_specs_keep_every_entry(tmp_path):
    writers, rounds, buckets = 4, 3, 6
    context = multiprocessing.get_context("spawn")
    with context.Pool(writers) as pool:
        pool.map(_started, range(writers))  # every worker up (torch imported) before the races
        for round_ in range(rounds):
            directory = tmp_path / f"round{round_}"
            pool.map(_writer, [(str(directory), i, buckets) for i in range(writers)])
            written = read_table(directory / FILE)["entries"]["graph"]
            assert sorted(written) == sorted(SPECS[:writers]), round_
            for i in range(writers):
                assert written[SPECS[i]] == {
                    str(b): entry(median=float(i + b)) for b in range(1, buckets + 1)
                }, (round_, i)
            assert not list(directory.glob("*.tmp")), "temporary files left behind"


def _started(_: int) -> None:
    """Pool warm-up task: a spawned worker runs it once it has imported this module."""


def test_same_entry_the_later_merge_wins(tmp_path):
    path = tmp_path / FILE
    merge_into_table(path, table({SPECS[0]: {"16": entry(median=9.0)}}))
    merge_into_table(path, table({SPECS[0]: {"16": entry("triton", TRITON, 4.0)}}))
    merge_into_table(path, table({SPECS[1]: {"16": entry(median=7.0)}}))
    written = read_table(path)["entries"]["graph"]
    assert written[SPECS[0]] == {"16": entry("triton", TRITON, 4.0)}
    assert written[SPECS[1]] == {"16": entry(median=7.0)}


# -- merging into a damaged table ------------------------------------------------------------

BAD_ENTRIES = {
    "negative_median": ({"8": {**entry(), "median_us": -1}}, "median_us"),
    "superscript_bucket": ({"²": entry()}, "'²'"),
    "zero_padded_bucket": ({"016": entry()}, "'016'"),
    "arabic_indic_bucket": ({"١٦": entry()}, "'١٦'"),
    "unknown_provider": ({"8": entry("warp_drive")}, "warp_drive"),
    "float_config_value": ({"8": entry("triton", config={**TRITON, "block_t": 4.0})}, "4.0"),
    "bool_config_value": ({"8": entry("triton", config={**TRITON, "num_stages": True})}, "True"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_merge_drops_only_the_bad_entries_and_names_them(tmp_path, case):
    bad_buckets, fault = BAD_ENTRIES[case]
    old = table({SPECS[0]: {"1": entry(), "2": entry()}, SPECS[1]: {"4": entry(), **bad_buckets}})
    path = tmp_path / FILE
    path.write_text(json.dumps(old, ensure_ascii=False))
    with pytest.warns(RopeTableWarning) as caught:
        merge_into_table(path, table({SPECS[2]: {"8": entry()}}), provider_names())
    (message,) = [str(w.message) for w in caught]
    assert f"entries.graph.{SPECS[1]}." in message and fault in message, message
    written = read_table(path, provider_names())["entries"]["graph"]
    assert written == {
        SPECS[0]: {"1": entry(), "2": entry()},
        SPECS[1]: {"4": entry()},
        SPECS[2]: {"8": entry()},
    }
    report = check_table_target(tmp_path, DEVICE, provider_names())  # nothing left to drop
    assert report.exists and report.dropped == () and report.unreadable is None


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        (json.dumps({**table({SPECS[0]: {"1": entry()}}), "schema_version": 2}), "schema_version"),
        ('{"schema_version": 1, "entr', "not valid JSON"),
        (json.dumps([1, 2, 3]), "JSON object"),
    ],
    ids=["schema_version_2", "torn_json", "not_an_object"],
)
def test_unreadable_table_is_kept_aside_never_deleted(tmp_path, content, fault):
    path = tmp_path / FILE
    path.write_text(content)
    report = check_table_target(tmp_path, DEVICE)
    assert report.unreadable is not None and fault in report.unreadable
    with pytest.warns(RopeTableWarning, match=r"kept it as .*\.bad-") as caught:
        merge_into_table(path, table({SPECS[0]: {"8": entry()}}))
    (kept,) = tmp_path.glob(f"{FILE}.bad-*")
    assert kept.read_text() == content  # byte for byte
    assert str(kept) in str(caught[0].message) and fault in str(caught[0].message)
    assert read_table(path)["entries"]["graph"] == {SPECS[0]: {"8": entry()}}


def test_merge_of_an_invalid_new_table_writes_nothing(tmp_path):
    path = tmp_path / FILE
    merge_into_table(path, table({SPECS[0]: {"1": entry()}}))
    before = path.read_bytes()
    with pytest.raises(TableError, match="median_us"):
        merge_into_table(path, table({SPECS[0]: {"2": {**entry(), "median_us": 0}}}))
    assert path.read_bytes() == before


# -- dead writers ----------------------------------------------------------------------------


def test_a_dead_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    path = tmp_path / FILE
    write_table(path, table({SPECS[0]: {"1": entry()}}))
    stale = tmp_path / f".{FILE}.0123456789abcdef.tmp"  # what a killed writer leaves
    stale.write_bytes(b"x" * 4096)
    other = tmp_path / ".other.json.0123456789abcdef.tmp"  # another table's: not ours
    other.write_bytes(b"y")
    merge_into_table(path, table({SPECS[1]: {"1": entry()}}))
    assert not stale.exists() and other.exists()
    stale.write_bytes(b"x")
    write_table(path, table({SPECS[1]: {"1": entry()}}))
    assert not stale.exists()


def test_a_writer_killed_mid_write_leaves_the_old_table_and_the_next_cleans_up(tmp_path):
    path = tmp_path / FILE
    write_table(path, table({SPECS[0]: {"1": entry()}}))
    payload = json.dumps(table({SPECS[1]: {"1": entry()}}))
    script = textwrap.dedent(f"""
        import json, os
        from kernels.table import write_table
        os.fsync = lambda fd: os._exit(9)  # killed with its temporary file half done
        write_table({str(path)!r}, json.loads({payload!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 9, run.stderr[-2000:]
    assert list(tmp_path.glob(f".{FILE}.*.tmp")), "the killed writer left no temporary file"
    assert read_table(path)["entries"]["graph"] == {SPECS[0]: {"1": entry()}}
    merge_into_table(path, table({SPECS[2]: {"1": entry()}}))
    assert not list(tmp_path.glob(f".{FILE}.*.tmp"))
    assert sorted(read_table(path)["entries"]["graph"]) == sorted([SPECS[0], SPECS[2]])


# -- pre-flight ------------------------------------------------------------------------------


def test_check_table_target_names_a_bad_output(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=rf"^output: {a_file} is a file"):
        check_table_target(a_file, DEVICE)
    with pytest.raises(ValueError, match=rf"^--out: {a_file / 'sub' / 'dir'} is under a file"):
        check_table_target(a_file / "sub" / "dir", DEVICE, flag="--out")
    with pytest.raises(ValueError, match="expected a directory, got an empty string"):
        check_table_target("", DEVICE)
    (tmp_path / "out" / FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match="is a directory, not a table file"):
        check_table_target(tmp_path / "out", DEVICE)
    fresh = check_table_target(tmp_path / "not" / "yet", DEVICE)  # made on write
    assert (fresh.exists, fresh.dropped, fresh.unreadable) == (False, (), None)
    assert not (tmp_path / "not").exists(), "the pre-flight must not create anything"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_table_target_refuses_a_read_only_directory(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_table_target(tmp_path / "sub", DEVICE)
    finally:
        tmp_path.chmod(0o755)


def test_an_output_directory_is_checked_once(tmp_path, monkeypatch):
    from kernels import _table_write

    checked = []
    real = _table_write.unwritable_reason
    monkeypatch.setattr(_table_write, "unwritable_reason", lambda d: checked.append(d) or real(d))
    output = check_output_dir(tmp_path / "out", "--output")
    assert isinstance(output, OutputDir) and output == str(tmp_path / "out")
    assert output.path == tmp_path / "out" and checked == [tmp_path]
    joined = output / FILE  # a plain path, not one taken as checked
    assert joined == tmp_path / "out" / FILE and not isinstance(joined, OutputDir)
    assert check_output_dir(output) is output  # passed on: not checked again
    assert check_table_target(output, DEVICE).path == tmp_path / "out" / FILE
    assert checked == [tmp_path]


def test_an_atomic_write_replaces_the_whole_file_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "model.json"
    assert write_atomically(path, b"old") == path and path.read_bytes() == b"old"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temporary left


def test_check_table_target_reports_what_a_merge_would_drop(tmp_path):
    old = table({SPECS[0]: {"1": entry(), "016": entry()}, SPECS[1]: {"4": entry("warp_drive")}})
    (tmp_path / FILE).write_text(json.dumps(old))
    report = check_table_target(tmp_path, DEVICE, provider_names())
    assert report.path == tmp_path / FILE and len(report.dropped) == 2
    assert any("'016'" in line for line in report.dropped)
    assert any("warp_drive" in line for line in report.dropped)
    assert (tmp_path / FILE).read_text() == json.dumps(old)  # read only


# -- process state ---------------------------------------------------------------------------


def test_written_table_gets_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_table(tmp_path / FILE, table({SPECS[0]: {"1": entry()}}))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
def test_importing_and_writing_never_touch_the_umask(tmp_path):
    payload = json.dumps(table({SPECS[0]: {"1": entry()}}))
    script = textwrap.dedent(f"""
        import json, os

        def refuse(mask):
            raise AssertionError("os.umask called")

        os.umask = refuse
        import kernels
        from kernels.table import merge_into_table
        merge_into_table({str(tmp_path / FILE)!r}, json.loads({payload!r}))
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
