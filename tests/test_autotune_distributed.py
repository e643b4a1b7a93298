"""Several worker processes on one study storage (a journal file, or a real PostgreSQL server):
one complete table, no candidate measured twice, and a killed worker losing no finished trial."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest
from conftest import CPU_TABLE, QUICK, TINY
from optuna.trial import TrialState

from autotune import open_storage, tune
from autotune.cli import main
from autotune.distributed import ClaimBook, fail_orphans
from autotune.export import build_tables
from autotune.studies import is_counted
from kernels.table import read_table

ROOT = Path(__file__).resolve().parent.parent


# -- a PostgreSQL server of our own, on loopback -------------------------------------------------


def _pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway cluster: initdb in a temporary directory, started with pg_ctl on loopback.
    PostgreSQL refuses to run as root, so under root (CI) it runs as the ``postgres`` user."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="rope-autotune-pg-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        runuser = shutil.which("runuser") or shutil.which("su")
        if runuser is None:
            pytest.skip("running as root without runuser to drop privileges")
        as_user = [runuser, "-u", "postgres", "--"]
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = os.path.join(root, "data"), _free_port()

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)

    done = run(str(bindir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    if done.returncode != 0:
        pytest.skip(f"initdb failed: {done.stderr.strip()[-300:]}")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = os.path.join(root, "server.log")
    done = run(str(bindir / "pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start")
    if done.returncode != 0:
        pytest.skip(f"pg_ctl start failed: {done.stderr.strip()[-300:]}")
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    run(str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
    shutil.rmtree(root, ignore_errors=True)


_DB_COUNTER = iter(range(1_000_000))


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path):
    """A fresh shared storage: a journal file, or a new database on the PostgreSQL server."""
    if request.param == "journal":
        return str(tmp_path / "studies.journal")
    server = request.getfixturevalue("postgres_url")
    import psycopg2

    name = f"tune_{os.getpid()}_{next(_DB_COUNTER)}"
    conn = psycopg2.connect(server)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return server.rsplit("/", 1)[0] + "/" + name


# -- helpers -------------------------------------------------------------------------------------


def studies(storage):
    """(trials per tuning study, claim markers) in a storage."""
    tuning, claims = {}, {}
    for s in storage.get_all_studies():
        if "#claim" in s.study_name:
            claims[s.study_name] = s.user_attrs
        else:
            tuning[s.study_name] = storage.get_all_trials(s._study_id, deepcopy=False)
    return tuning, claims


def len_and_text(name):
    return len(name), name  # claim generations in numeric order


def assert_complete_without_duplicates(storage, buckets, target):
    tuning, claims = studies(storage)
    assert len(tuning) == len(buckets)
    for name, trials in tuning.items():
        measured = [
            (t.user_attrs["provider"], tuple(sorted(t.user_attrs["config"].items())))
            for t in trials
            if t.user_attrs.get("outcome") == "measured"
        ]
        assert len(measured) == len(set(measured)), f"{name}: a candidate measured twice"
        counted = [t for t in trials if is_counted(t)]
        assert len(counted) == target, name
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        newest = max((k for k in claims if k.startswith(name + "#")), key=len_and_text)
        assert claims[newest].get("released"), f"{newest} was not released"
    return tuning, claims


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_cpu_workers_fill_one_table(storage_url, tmp_path):
    buckets = [1, 2, 3, 4]
    table = tune(
        [TINY], buckets, devices=["cpu", "cpu"], providers=["torch", "triton"], trials=2,
        storage=storage_url, output=tmp_path / "out", seed=0, progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    assert set(table["entries"]["graph"][TINY.key]) == {str(b) for b in buckets}
    assert read_table(tmp_path / "out" / CPU_TABLE)["entries"] == table["entries"]
    storage = open_storage(storage_url)
    tuning, claims = assert_complete_without_duplicates(storage, buckets, target=2)
    # Each study was claimed once (no contention, no takeover), and both workers took some.
    assert len(claims) == len(tuning) and all(k.endswith("#claim0") for k in claims)
    assert {c["worker"] for c in claims.values()} == {"worker0@cpu", "worker1@cpu"}
    assert build_tables(storage)["CPU x86_64"]["entries"] == table["entries"]
    # `python -m autotune export` writes the same table from the storage alone.
    assert (
        main(["export", "--storage", storage_url, "--output", str(tmp_path / "x"), "--quiet"]) == 0
    )
    assert read_table(tmp_path / "x" / CPU_TABLE)["entries"] == table["entries"]


@pytest.mark.slow
def test_killed_worker_loses_no_finished_trial(storage_url, tmp_path):
    buckets = [1, 2, 3, 4, 5]
    argv = [
        sys.executable, "-m", "autotune", "--devices", "cpu,cpu", "--head-size", "16",
        "--num-heads", "2", "--num-kv-heads", "1", "--dtype", "fp32", "--tokens",
        ",".join(map(str, buckets)), "--providers", "torch,triton", "--trials", "2",
        "--storage", storage_url, "--output", str(tmp_path / "out"), "--seed", "0", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    storage = open_storage(storage_url) if "://" not in storage_url else None
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            storage = storage or open_storage(storage_url)
            tuning, claims = studies(storage)
        except Exception:  # the database or journal is not created yet
            continue
        finished = sum(t.state == TrialState.COMPLETE for ts in tuning.values() for t in ts)
        live = [c for c in claims.values() if not c.get("released") and "pid" in c]
        if finished >= 2 and live:
            victim = live[0]
            os.kill(victim["pid"], signal.SIGKILL)
    assert victim is not None, "no worker was caught holding a study"
    tuning, _ = studies(storage)
    finished_at_kill = {
        (name, t.number): t.value
        for name, trials in tuning.items()
        for t in trials
        if t.state == TrialState.COMPLETE
    }
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "died" in err  # the parent reports the dead worker; the survivor finishes its work
    tuning, claims = assert_complete_without_duplicates(storage, buckets, target=2)
    after = {(name, t.number): t for name, trials in tuning.items() for t in trials}
    for key, value in finished_at_kill.items():
        assert after[key].state == TrialState.COMPLETE and after[key].value == value
    # The victim's study was taken over (a second claim generation), its orphan trial failed
    # and not counted.
    assert any(k.endswith("#claim1") for k in claims)
    for t in after.values():
        if t.state == TrialState.FAIL:
            assert not is_counted(t) or "error" in t.user_attrs
    table = read_table(tmp_path / "out" / CPU_TABLE)
    assert set(table["entries"]["graph"][TINY.key]) == {str(b) for b in buckets}


def test_claims_exclude_each_other_and_dead_owners_are_replaced(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    first, second = ClaimBook(storage, "a"), ClaimBook(storage, "b")
    first.refresh()
    second.refresh()  # both saw no claim: a race that the atomic create decides
    claim = first.try_claim("study-x")
    assert claim is not None
    assert second.try_claim("study-x") is None  # generation 0 is taken
    second.refresh()
    assert second.owner("study-x") == "a" and second.try_claim("study-x") is None
    claim.release()
    second.refresh()
    assert second.owner("study-x") is None
    taken = second.try_claim("study-x")
    assert taken is not None and taken.generation == 1
    # An owner on this host whose process is gone is dead at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    storage.set_study_user_attr(taken.study_id, "pid", int(dead))
    first.refresh()
    assert first.owner("study-x") is None
    assert first.try_claim("study-x").generation == 2
    # A heartbeat older than the grace period is dead too, wherever its owner runs.
    stale = ClaimBook(storage, "c", grace_s=0.5)
    stale.refresh()
    taken._stop.set()
    time.sleep(0.6)
    assert stale.owner("study-y") is None and stale.try_claim("study-y").generation == 0


def test_orphaned_running_trials_are_failed(tmp_path):
    import optuna

    storage = open_storage(tmp_path / "s.journal")
    study = optuna.create_study(storage=storage, study_name="s")
    study.ask()  # a trial whose worker died
    study.tell(study.ask(), 1.0)
    assert fail_orphans(storage, "s") == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert fail_orphans(storage, "missing") == 0
