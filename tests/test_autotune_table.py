"""Tables from studies: the entry each bucket gets, schema round trip, merging into an existing
file, and a writer that dies mid-write."""

import importlib.metadata
import os
import sys
from datetime import datetime, timezone

import optuna
import orjson
import pytest
import torch
from conftest import ROOT
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from autotune.cli import main
from autotune.export import best_entry, build_tables, export_tables, write_device_table
from autotune.storage import open_storage
from autotune.studies import StudyKey, is_complete
from kernels import RopeSpec, get_provider, provider_names
from kernels.table import (
    RopeTableWarning,
    TableEntry,
    TableError,
    empty_table,
    library_versions,
    read_table,
    source_version,
    spec_entries,
    validate_table,
    write_table,
)

SPEC = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
OTHER = RopeSpec(256, 64, 16, 16, False, torch.float16)
META = {"device_name": "Test GPU", "compute_capability": "9.0", "sm_count": 132,
        "versions": {"torch": "2.11"}, "updated": "2026-01-01T00:00:00+00:00"}  # fmt: skip


def _trial(
    provider,
    median,
    outcome="measured",
    config=None,
    state=TrialState.COMPLETE,
    finished=datetime(2025, 12, 31, tzinfo=timezone.utc),  # before META's "updated"
):
    attrs = {"provider": provider, "config": config or {}, "outcome": outcome}
    if outcome in ("measured", "duplicate"):
        attrs.update(median_us=median, p20_us=median * 0.9, p80_us=median * 1.1)
    trial = create_trial(
        state=state,
        value=median if state == TrialState.COMPLETE else None,
        params={"provider": provider},
        distributions={"provider": CategoricalDistribution(["torch", "triton", "vllm"])},
        user_attrs=attrs,
    )
    trial.datetime_complete = finished
    return trial


def _add_study(
    storage, name, spec, tokens, trials, timing="graph", complete=True, meta=META, revisions=None
):
    study = optuna.create_study(storage=storage, study_name=name)
    key = StudyKey.current(meta["device_name"], timing, spec, tokens, ["torch", "triton", "vllm"])
    attrs = key.attrs(meta)
    attrs["revisions"].update(revisions or {})
    for attr, value in {**attrs, "target": len(trials)}.items():
        study.set_user_attr(attr, value)
    if complete:
        study.set_user_attr("complete", len(trials))
    for trial in trials:
        study.add_trial(trial)
    return study


def test_best_entry_only_measured_trials_win():
    cfg = {"block_t": 4, "block_h": 8, "head_split": 1, "num_warps": 4, "num_stages": 1}
    entry = best_entry([
        _trial("torch", 30.0),
        _trial("triton", 12.0, config=cfg),
        _trial("triton", 15.0, config={**cfg, "block_t": 8}),
        _trial("triton", 5.0, outcome="duplicate"),  # a repeat is not a measurement
        _trial("vllm", None, outcome="wrong", state=TrialState.FAIL),
        _trial("vllm", None, outcome="invalid", state=TrialState.PRUNED),
    ])  # fmt: skip
    assert entry == TableEntry(
        provider="triton", config=cfg, median_us=12.0, p20_us=12.0 * 0.9, p80_us=12.0 * 1.1,
        providers_us={"torch": 30.0, "triton": 12.0},
    )  # fmt: skip
    assert best_entry([_trial("vllm", None, outcome="error", state=TrialState.FAIL)]) is None


def test_build_tables_groups_and_skips_unfinished():
    storage = optuna.storages.InMemoryStorage()
    _add_study(storage, "a", SPEC, 16, [_trial("torch", 9.0), _trial("triton", 7.0)])
    # Same bucket, another provider set: its trials compete with the first study's.
    _add_study(storage, "b", SPEC, 16, [_trial("vllm", 6.0)])
    _add_study(storage, "c", SPEC, 32, [_trial("torch", 11.0)], timing="eager")
    unfinished = _add_study(storage, "d", OTHER, 1, [_trial("torch", 3.0)], complete=False)
    unfinished.set_user_attr("target", 2)
    _add_study(storage, "e", OTHER, 2, [_trial("torch", None, "error", state=TrialState.FAIL)])
    other_meta = {**META, "device_name": "Other GPU"}
    _add_study(storage, "f", SPEC, 1, [_trial("torch", 4.0)], meta=other_meta)
    optuna.create_study(storage=storage, study_name="not ours")

    tables = build_tables(storage)
    assert set(tables) == {"Test GPU", "Other GPU"}
    table = tables["Test GPU"]
    validate_table(table)
    assert table["metadata"] == META
    graph = table["entries"]["graph"]
    assert set(graph) == {SPEC.key}  # OTHER: one study unfinished, one with nothing measured
    assert graph[SPEC.key]["16"]["provider"] == "vllm"
    assert graph[SPEC.key]["16"]["providers_us"] == {"torch": 9.0, "triton": 7.0, "vllm": 6.0}
    assert table["entries"]["eager"][SPEC.key]["32"]["median_us"] == 11.0
    partial = build_tables(storage, include_partial=True)["Test GPU"]
    assert partial["entries"]["graph"][OTHER.key]["1"]["provider"] == "torch"
    only_a = build_tables(storage, study_names=["a"])["Test GPU"]
    assert only_a["entries"]["graph"][SPEC.key]["16"]["provider"] == "triton"


def test_build_tables_leaves_out_studies_of_an_older_kernel():
    # Triton's kernel changed since the first two studies timed it: their 1 us is not what runs.
    storage = optuna.storages.InMemoryStorage()
    revision = get_provider("triton").revision
    for name, old in (("old1", 1), ("old2", revision - 1)):
        _add_study(storage, name, SPEC, 16, [_trial("triton", 1.0)], revisions={"triton": old})
    _add_study(storage, "now", SPEC, 16, [_trial("torch", 9.0), _trial("triton", 7.0)])
    entry = build_tables(storage)["Test GPU"]["entries"]["graph"][SPEC.key]["16"]
    assert entry["median_us"] == 7.0
    assert entry["providers_us"] == {"torch": 9.0, "triton": 7.0}


def test_a_study_whose_trials_all_ran_counts_as_complete_without_its_flag():
    # A stop between the study's last trial and its "complete" flag must not lose the bucket.
    storage = optuna.storages.InMemoryStorage()
    _add_study(
        storage, "a", SPEC, 16, [_trial("torch", 9.0), _trial("triton", 7.0)], complete=False
    )
    assert build_tables(storage)["Test GPU"]["entries"]["graph"][SPEC.key]["16"]["median_us"] == 7.0


def test_a_retried_study_is_complete_only_when_its_retry_fills_the_budget():
    # Two failures, then a retry from scratch that has measured one of its two trials so far.
    failed = [_trial("vllm", None, "error", state=TrialState.FAIL) for _ in range(2)]
    trials = [*failed, _trial("torch", 9.0)]
    assert not is_complete({"target": 2, "retry_from": 2}, trials)
    assert is_complete({"target": 2, "retry_from": 2}, [*trials, _trial("triton", 7.0)])
    assert is_complete({"target": 2}, trials)  # without a retry every counted trial counts


def test_build_tables_dates_the_table_by_its_newest_measurement():
    # A study resumed with a larger budget keeps its creation metadata; the table's "updated"
    # still says when its newest measurement was taken.
    storage = optuna.storages.InMemoryStorage()
    later = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    _add_study(
        storage, "a", SPEC, 16, [_trial("torch", 9.0), _trial("triton", 7.0, finished=later)]
    )
    _add_study(storage, "b", SPEC, 32, [_trial("torch", 9.0)])
    table = build_tables(storage)["Test GPU"]
    assert table["metadata"] == {**META, "updated": "2026-03-04T05:06:07+00:00"}


def _table(entries):
    table = empty_table(META)
    for (timing, spec, bucket), (provider, median) in entries.items():
        table["entries"].setdefault(timing, {}).setdefault(spec.key, {})[str(bucket)] = {
            "provider": provider, "config": {}, "median_us": median, "p20_us": median,
            "p80_us": median, "providers_us": {provider: median},
        }  # fmt: skip
    return table


def test_round_trip_and_merge(tmp_path):
    old = _table({
        ("graph", SPEC, 1): ("torch", 5.0),
        ("graph", SPEC, 2): ("torch", 6.0),
        ("eager", OTHER, 4): ("vllm", 7.0),
    })  # fmt: skip
    path = write_device_table(tmp_path, old)
    assert path == tmp_path / "Test_GPU.json"
    assert read_table(path) == old  # schema round trip
    new = _table({("graph", SPEC, 2): ("triton", 3.0), ("graph", OTHER, 8): ("triton", 2.0)})
    new["metadata"] = {**META, "updated": "2026-02-02T00:00:00+00:00"}
    merged = read_table(write_device_table(tmp_path, new))
    graph = merged["entries"]["graph"]
    assert graph[SPEC.key]["1"]["provider"] == "torch"  # not re-tuned: kept
    assert graph[SPEC.key]["2"]["provider"] == "triton"  # re-tuned: replaced
    assert graph[OTHER.key]["8"]["median_us"] == 2.0  # new: added
    assert merged["entries"]["eager"][OTHER.key]["4"]["provider"] == "vllm"  # other mode kept
    assert merged["metadata"]["updated"] == "2026-02-02T00:00:00+00:00"
    # Sorted keys, so a re-tune diffs cleanly.
    assert (
        path.read_bytes()
        == orjson.dumps(merged, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    )


SHIPPED_TABLES = sorted(
    p for p in (ROOT / "configs").glob("*.json") if not p.name.endswith(".model.json")
)


def test_both_measured_devices_ship_a_table():
    assert {p.name for p in SHIPPED_TABLES} >= {"NVIDIA_H200.json", "NVIDIA_H100_80GB_HBM3.json"}


@pytest.mark.parametrize("shipped", SHIPPED_TABLES, ids=lambda p: p.stem)
def test_every_shipped_spec_spans_the_bucket_range(shipped):
    """A spec's entries serve every token count, those beyond its tuned buckets from the
    nearest one: a partly tuned spec (a tuning run stopped within it) would stretch a 2-token
    winner over 65536 tokens, and stand in as the nearest spec for others. Ship whole specs."""
    for timing, specs in read_table(shipped, provider_names())["entries"].items():
        for spec_key, buckets in specs.items():
            tuned = sorted(int(b) for b in buckets)
            assert (tuned[0], tuned[-1]) == (1, 65536), (timing, spec_key, tuned)


@pytest.mark.parametrize("shipped", SHIPPED_TABLES, ids=lambda p: p.stem)
def test_the_shipped_table_round_trips_byte_for_byte_through_its_entries(tmp_path, shipped):
    table = read_table(shipped, provider_names())
    for timing, specs in table["entries"].items():
        for spec_key in specs:
            entries = spec_entries(table, timing, spec_key)
            assert list(entries) == sorted(int(b) for b in specs[spec_key])
            specs[spec_key] = {str(b): e.to_json() for b, e in entries.items()}
    assert write_table(tmp_path / shipped.name, table).read_bytes() == shipped.read_bytes()


@pytest.mark.parametrize(
    ("field", "value", "fault"),
    [
        ("provider", None, "provider: expected a string"),
        ("config", {"block_t": 4.0}, "config"),
        ("median_us", float("nan"), "median_us: expected a positive finite time"),
        ("p80_us", 0, "p80_us: expected a positive finite time"),
        ("providers_us", {"torch": -1.0}, "providers_us.torch"),
    ],
)
def test_an_entry_off_the_schema_is_refused_by_name(field, value, fault):
    data = {"provider": "triton", "config": None, "median_us": 2.0, "providers_us": {}}
    with pytest.raises(TableError, match=rf"^here\.{fault}"):
        TableEntry.from_json({**data, field: value}, where="here")
    entry = TableEntry.from_json(data)  # config null, no percentiles: written back as read
    assert (entry.config, entry.p20_us, entry.p80_us) == (None, None, None)
    assert entry.to_json() == data


def test_an_unreadable_table_is_kept_aside_when_the_tuner_writes(tmp_path):
    (tmp_path / "Test_GPU.json").write_text('{"schema_version": 1, "entr')
    new = _table({("graph", SPEC, 1): ("torch", 5.0)})
    with pytest.warns(RopeTableWarning, match="kept it as"):
        read = read_table(write_device_table(tmp_path, new))
    assert read["entries"] == new["entries"]
    (kept,) = tmp_path.glob("Test_GPU.json.bad-*")
    assert kept.read_text() == '{"schema_version": 1, "entr'


def test_failed_rename_leaves_old_table_and_no_temp_file(tmp_path, monkeypatch):
    old = _table({("graph", SPEC, 1): ("torch", 5.0)})
    path = write_device_table(tmp_path, old)
    before = path.read_bytes()

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        write_device_table(tmp_path, _table({("graph", SPEC, 1): ("triton", 1.0)}))
    assert path.read_bytes() == before
    # The lock file stays (it is reused); no temporary file does.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".Test_GPU.json.lock", "Test_GPU.json"]


def test_export_command_writes_the_table(tmp_path, capsys):
    storage_path = tmp_path / "s.journal"
    storage = open_storage(storage_path)
    _add_study(storage, "a", SPEC, 16, [_trial("torch", 9.0), _trial("triton", 7.0)])
    unfinished = _add_study(storage, "b", SPEC, 32, [_trial("torch", 4.0)], complete=False)
    unfinished.set_user_attr("target", 2)
    assert main(["export", "--storage", str(storage_path), "--output", str(tmp_path / "o")]) == 0
    table = read_table(tmp_path / "o" / "Test_GPU.json")
    assert set(table["entries"]["graph"][SPEC.key]) == {"16"}
    assert "Test GPU" in capsys.readouterr().out
    export_tables(storage, tmp_path / "o", include_partial=True)
    table = read_table(tmp_path / "o" / "Test_GPU.json")
    assert set(table["entries"]["graph"][SPEC.key]) == {"16", "32"}


@pytest.mark.parametrize(
    "line",
    ["__version__ = version = '0.26.0'", '__version__ = "0.26.0"'],
    ids=["vcs-versioning", "plain"],
)
def test_vllm_files_without_metadata_still_report_their_version(tmp_path, monkeypatch, line):
    # The H200 machine has vLLM's files on the path but no installed distribution: the table's
    # header must still name the version whose op it timed, without importing vLLM.
    package = tmp_path / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "_version.py").write_text(f"# generated\n{line}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert source_version("vllm") == "0.26.0"
    try:  # an installed vLLM's metadata comes first
        installed = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        installed = "0.26.0"
    assert library_versions()["vllm"] == installed
    assert "vllm" not in sys.modules
    assert source_version("no_such_package_here") is None
