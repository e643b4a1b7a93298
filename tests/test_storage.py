"""``autotune.storage``: opening journals and databases, one-line errors, torn journals."""

import importlib.util
import logging

import optuna
import pytest

from autotune.storage import StorageError, default_storage_path, open_storage

optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_study(storage, name, trials=3):
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)


def trial_counts(storage):
    return {
        s.study_name: len(optuna.load_study(study_name=s.study_name, storage=storage).trials)
        for s in storage.get_all_studies()
    }


def test_default_path_is_a_journal_in_the_user_cache():
    path = default_storage_path()
    assert path.name == "studies.journal" and "rope-autotune" in str(path)


def test_journal_round_trip_and_prefix(tmp_path):
    path = tmp_path / "new" / "s.journal"  # its directory is created
    run_study(open_storage(path), "a")
    assert trial_counts(open_storage(f"journal:{path}")) == {"a": 3}
    assert trial_counts(open_storage(str(path), create=False)) == {"a": 3}


def test_sqlite_round_trip(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(open_storage(url), "a", trials=2)
    assert trial_counts(open_storage(url, create=False)) == {"a": 2}


# -- one line naming the storage and the fix -----------------------------------------------------


def bad_storages(tmp_path):
    (tmp_path / "file").write_text("x")
    return [
        ("", "empty"),
        ("   ", "empty"),
        ("journal:", "no path"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "file" / "s.journal"), "is a file, not a directory"),
        (str(tmp_path / "file" / "deeper" / "s.journal"), "is a file, not a directory"),
        ("garbage://x", "unknown scheme 'garbage'"),
        ("http://example.com/studies", "unknown scheme 'http'"),
        (f"sqlite:///{tmp_path}", "is a directory"),
        (f"sqlite:///{tmp_path / 'no' / 'such' / 's.db'}", "does not exist"),
        (f"sqlite:///{tmp_path / 'file' / 's.db'}", "not writable"),
        ("mysql://user:secret@localhost/db", "no database driver"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_storage_is_one_line_naming_it(tmp_path, case):
    url, reason = bad_storages(tmp_path)[case]
    with pytest.raises(StorageError) as exc:
        open_storage(url)
    message = str(exc.value)
    assert reason in message and "\n" not in message
    assert "secret" not in message  # passwords are hidden
    shown = url.replace("secret", "***")
    assert repr(shown) in message or shown.strip() in message or not shown.strip()
    assert isinstance(exc.value, ValueError)


def test_postgres_without_driver(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without_drivers(name, *args, **kwargs):
        return None if name in ("psycopg", "psycopg2") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_drivers)
    with pytest.raises(StorageError, match=r"localhost/db.*pip install psycopg2-binary"):
        open_storage("postgresql://user@localhost/db")


@pytest.mark.skipif(importlib.util.find_spec("psycopg2") is None, reason="needs psycopg2")
def test_postgres_unreachable_is_one_line():
    with pytest.raises(StorageError, match=r"cannot open the database .*server runs") as exc:
        open_storage("postgresql://user:pw@127.0.0.1:1/db")
    assert "\n" not in str(exc.value) and ":pw@" not in str(exc.value)


def test_read_only_location(read_only_dir):
    with pytest.raises(StorageError, match="not writable"):
        open_storage(read_only_dir / "s.journal")
    with pytest.raises(StorageError, match="not writable"):
        open_storage(read_only_dir / "sub" / "s.journal")
    with pytest.raises(StorageError, match="not writable"):
        open_storage(f"sqlite:///{read_only_dir / 's.db'}")


def test_reading_creates_nothing(tmp_path):
    for url in (tmp_path / "typo.journal", f"sqlite:///{tmp_path / 'typo.db'}"):
        with pytest.raises(StorageError, match="typo") as exc:
            open_storage(url, create=False)
        assert "never creates" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


# -- torn journals --------------------------------------------------------------------------------


def journal_with_studies(tmp_path):
    path = tmp_path / "s.journal"
    storage = open_storage(path)
    run_study(storage, "a")
    run_study(storage, "b", trials=2)
    return path


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(lambda last: last[: len(last) // 2], id="partial-last-line"),
        pytest.param(lambda last: last[:-1], id="record-without-newline"),
        pytest.param(lambda last: last[:10] + b"\n", id="undecodable-last-record"),
        pytest.param(lambda last: b"\0" * 40, id="zero-filled-tail"),
    ],
)
def test_torn_tail_is_repaired_and_resumes(tmp_path, caplog, tear):
    path = journal_with_studies(tmp_path)
    intact = path.read_bytes()
    torn = intact + tear(b'{"op_code":5,"worker_id":"w","trial_id":99,"state":1}\n')
    path.write_bytes(torn)

    with caplog.at_level(logging.WARNING, logger="autotune.storage"):
        storage = open_storage(path)
    assert path.read_bytes() == intact
    (backup,) = tmp_path.glob("s.journal.torn-*")
    assert backup.read_bytes() == torn
    assert str(path) in caplog.text and str(backup) in caplog.text

    run_study(storage, "c")  # a resume writes new records after the repaired end
    run_study(storage, "a", trials=1)
    assert trial_counts(open_storage(path)) == {"a": 4, "b": 2, "c": 3}


def test_torn_tail_read_only_reader_reads_the_complete_records(tmp_path, caplog):
    path = journal_with_studies(tmp_path)
    path.write_bytes(path.read_bytes() + b'{"op_code":4,"wor')
    with caplog.at_level(logging.WARNING, logger="autotune.storage"):
        assert trial_counts(open_storage(path, create=False)) == {"a": 3, "b": 2}
    assert "torn" in caplog.text and not list(tmp_path.glob("*.torn-*"))


def test_damage_before_the_end_is_refused_naming_the_line(tmp_path):
    path = journal_with_studies(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:7] + lines[4]  # a torn record with the next one glued onto it
    del lines[4]
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    with pytest.raises(StorageError) as exc:
        open_storage(path)
    message = str(exc.value)
    assert str(path) in message and "line 4" in message and "head -n 3" in message
    assert "\n" not in message and path.read_bytes() == before


def test_tuner_resumes_on_a_torn_journal(tmp_path):
    from conftest import QUICK, TINY

    from autotune import tune
    from autotune.export import build_tables

    path = tmp_path / "s.journal"
    kwargs = {"device": "cpu", "providers": ["torch"], "trials": 1, "time_kwargs": QUICK}
    tune([TINY], [1], storage=str(path), progress=False, **kwargs)
    path.write_bytes(path.read_bytes() + b'{"op_code":0,"worker_id":"x","study_na')
    table = tune([TINY], [1, 2], storage=str(path), progress=False, **kwargs)
    assert set(table["entries"]["graph"][TINY.key]) == {"1", "2"}
    (built,) = build_tables(open_storage(path, create=False)).values()
    assert set(built["entries"]["graph"][TINY.key]) == {"1", "2"}
    assert len(list(tmp_path.glob("s.journal.torn-*"))) == 1
