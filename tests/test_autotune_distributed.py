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

import optuna
import pytest
from conftest import CPU_TABLE, QUICK, TINY
from optuna.trial import TrialState

from autotune import open_storage, tune
from autotune._compare_and_set import compare_and_set
from autotune.cli import main
from autotune.distributed import CLAIM_ATTR, Claim, ClaimBook, fail_orphans
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
    """(trials per study, claim per claimed study) in a storage."""
    tuning, claims = {}, {}
    for s in storage.get_all_studies():
        tuning[s.study_name] = storage.get_all_trials(s._study_id, deepcopy=False)
        if CLAIM_ATTR in s.system_attrs:
            claims[s.study_name] = s.system_attrs[CLAIM_ATTR]
    return tuning, claims


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
        assert claims[name]["released"], f"{name}: its claim was not released"
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
    assert len(claims) == len(tuning) and all(c["generation"] == 0 for c in claims.values())
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
    assert any(c["generation"] == 1 for c in claims.values())
    for t in after.values():
        if t.state == TrialState.FAIL:
            assert not is_counted(t) or "error" in t.user_attrs
    table = read_table(tmp_path / "out" / CPU_TABLE)
    assert set(table["entries"]["graph"][TINY.key]) == {str(b) for b in buckets}


def claim_races(storage):
    """Claims on one storage: they exclude each other, and dead owners are replaced."""
    first, second = ClaimBook(storage, "a"), ClaimBook(storage, "b")
    first.refresh()
    second.refresh()  # both saw no claim: a race that the compare-and-set decides
    claim = first.try_claim("study-x")
    assert claim is not None and claim.generation == 0
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
    study_id = storage.get_study_id_from_name("study-x")
    storage.set_study_system_attr(study_id, CLAIM_ATTR, {**taken.value, "pid": int(dead)})
    first.refresh()
    assert first.owner("study-x") is None
    again = first.try_claim("study-x")
    assert again.generation == 2
    # The owner taken over cannot release (nor refresh) the new owner's claim.
    taken.release()
    assert taken.lost()
    first.refresh()
    assert first.owner("study-x") == "a"
    # A heartbeat older than the grace period is dead too, wherever its owner runs.
    stale = ClaimBook(storage, "c", grace_s=0.5)
    time.sleep(0.6)  # the owner's next heartbeat is grace_s / 6 = 20 s away: it looks hung
    stale.refresh()
    assert stale.owner("study-x") is None and stale.try_claim("study-x").generation == 3
    again.release()
    assert again.lost()
    # Claims live on the studies themselves: no study was made but the claimed one.
    assert [s.study_name for s in storage.get_all_studies()] == ["study-x"]


def test_an_owner_taken_over_finds_out_at_its_next_heartbeat(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    value = {"generation": 0, "worker": "a", "heartbeat": time.time(), "released": False}
    assert compare_and_set(storage, study_id, CLAIM_ATTR, None, value)
    assert not compare_and_set(storage, study_id, CLAIM_ATTR, None, value)  # not absent now
    claim = Claim(storage, study_id, value, interval_s=0.01).start()
    deadline = time.monotonic() + 10
    while claim.value == value and time.monotonic() < deadline:
        time.sleep(0.01)
    assert claim.value["heartbeat"] > value["heartbeat"] and not claim.lost()
    thief = {**claim.value, "generation": 1, "worker": "b"}
    storage.set_study_system_attr(study_id, CLAIM_ATTR, thief)
    while not claim.lost() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert claim.lost()
    claim.release()
    assert storage.get_study_system_attrs(study_id)[CLAIM_ATTR] == thief


def test_claims_exclude_each_other_and_dead_owners_are_replaced(storage_url):
    claim_races(open_storage(storage_url))


def test_claims_on_a_storage_in_memory_or_sqlite(tmp_path):
    claim_races(optuna.storages.InMemoryStorage())
    claim_races(open_storage(f"sqlite:///{tmp_path / 's.db'}"))


def _race(storage_url: str, name: str, ready, out) -> None:
    book = ClaimBook(open_storage(storage_url), name)
    book.refresh()
    ready.wait()  # every racer has read the storage, so each saw the study unclaimed
    claim = book.try_claim("contested")
    out.put((name, None if claim is None else claim.generation))
    if claim is not None:
        claim.release()


@pytest.mark.slow
def test_of_many_processes_racing_for_one_claim_exactly_one_wins(storage_url):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    open_storage(storage_url)  # the journal or database exists before the race
    count = 6
    ready, out = context.Barrier(count), context.Queue()
    racers = [context.Process(target=_race, args=(storage_url, f"w{i}", ready, out))
              for i in range(count)]  # fmt: skip
    for racer in racers:
        racer.start()
    results = [out.get(timeout=300) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
    winners = [name for name, generation in results if generation is not None]
    assert len(winners) == 1, results
    storage = open_storage(storage_url)
    claim = storage.get_study_system_attrs(storage.get_study_id_from_name("contested"))
    assert claim[CLAIM_ATTR]["worker"] == winners[0] and claim[CLAIM_ATTR]["generation"] == 0


def test_orphaned_running_trials_are_failed(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    study = optuna.create_study(storage=storage, study_name="s")
    study.ask()  # a trial whose worker died
    study.tell(study.ask(), 1.0)
    assert fail_orphans(storage, "s") == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert fail_orphans(storage, "missing") == 0
