"""Compiling ahead: trials asked in batches, their Triton configs handed to a precompiler
before any of them runs; budgets, resume and interrupts behave as one trial at a time."""

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from optuna.trial import TrialState

from autotune import open_storage
from autotune.measure import check_correct, make_inputs
from autotune.precompile import (
    TritonPrecompiler,
    _compile_some,
    precompile_triton,
    triton_cache_dir,
)
from autotune.search import COUNTED_OUTCOMES, StudyKey, StudyRunner
from autotune.tune import _ahead_of_time_compiling, default_compile_workers
from kernels import RopeSpec, get_provider
from kernels.providers._triton import config_problems
from kernels.table import device_metadata

TINY = RopeSpec(16, 16, 2, 1, True, torch.float32)
QUICK = {"repeats": 3, "min_round_s": 0.0}
CPU = torch.device("cpu")


def _runner(storage, **kwargs) -> StudyRunner:
    meta = device_metadata(CPU)
    return StudyRunner(storage, CPU, meta["device_name"], meta, seed=0, time_kwargs=QUICK, **kwargs)


def _key(tokens=9) -> StudyKey:
    return StudyKey(device_metadata(CPU)["device_name"], "graph", TINY, tokens, ("torch", "triton"))


def _trials(storage, key):
    return storage.get_all_trials(storage.get_study_id_from_name(key.name), deepcopy=False)


def _measured(trials):
    return [
        (t.user_attrs["provider"], tuple(sorted(t.user_attrs["config"].items())))
        for t in trials
        if t.user_attrs.get("outcome") == "measured"
    ]


def test_each_batch_is_compiled_before_it_runs(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    batches = []

    def precompile(spec, configs):
        assert spec == TINY and 1 <= len(configs) <= 4
        assert all(not config_problems(spec, c) for c in configs)  # only valid ones
        measured_so_far = len(_measured(_trials(storage, key)))
        batches.append((measured_so_far, [tuple(sorted(c.items())) for c in configs]))

    key = _key()
    assert _runner(storage, trials=7, precompile=precompile, batch=4).run(key)
    trials = _trials(storage, key)
    assert len([t for t in trials if t.user_attrs.get("outcome") in COUNTED_OUTCOMES]) == 7
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    measured = _measured(trials)
    assert len(measured) == len(set(measured))
    handed = [config for _, configs in batches for config in configs]
    for provider, config in measured:
        if provider == "triton":
            assert config in handed  # compiled ahead, not in its own trial
    assert len(batches) >= 2  # 7 counted trials do not fit one batch of 4
    assert all(b < a for (b, _), (a, _) in itertools.pairwise(batches))


def test_a_batch_is_filled_with_measurements_not_asks(tmp_path):
    # Invalid and repeated asks need no compile and use no budget: a batch of 4 hands the
    # workers 4 new measurements however many of those come with them.
    storage = open_storage(tmp_path / "s.journal")
    key = _key()
    asked_by_batch = []

    def precompile(spec, configs):
        asked_by_batch.append(len(_trials(storage, key)))  # this batch's asks are in

    assert _runner(storage, trials=13, precompile=precompile, batch=4).run(key)
    trials = sorted(_trials(storage, key), key=lambda t: t.number)
    batches = [(b - a, counted_in(trials[a:b])) for a, b in itertools.pairwise(asked_by_batch)]
    batches = [(asked_by_batch[0], counted_in(trials[: asked_by_batch[0]])), *batches]
    # 4 measurements each, unless the sampler proposed 20 asks beyond them (the cap): TINY's
    # space is mostly invalid, and its first batch, sampled at random, reaches it.
    *full, (_, last) = batches
    assert all(counted == 4 or asked == 4 + 20 for asked, counted in full), batches
    assert any(asked > counted for asked, counted in full)  # invalid asks came along
    assert last == 13 - sum(counted for _, counted in full) <= 4


def counted_in(trials) -> int:
    return sum(t.user_attrs.get("outcome") in COUNTED_OUTCOMES for t in trials)


def test_the_precompiler_does_nothing_off_cuda():
    with TritonPrecompiler("cpu", workers=2) as precompiler:
        config = {"block_t": 1, "block_h": 1, "head_split": 1, "num_warps": 1, "num_stages": 1}
        assert precompiler(TINY, [config]) == 0
        assert precompiler._pool is None  # no processes started


def test_configs_must_be_mappings_on_every_device():
    # overlap_check.py once handed one config where a list belongs; off CUDA that went unseen.
    config = {"block_t": 1, "block_h": 1, "head_split": 1, "num_warps": 1, "num_stages": 1}
    precompiler = TritonPrecompiler("cpu", workers=2)
    with pytest.raises(TypeError, match="configs: expected mappings"):
        precompiler.submit(TINY, config)  # iterates over the dict's keys


class _InterpretingPrecompiler(TritonPrecompiler):
    """The real pool, allowed off CUDA: its workers run the configs under the interpreter."""

    _compiles_here = True


GOOD = {"block_t": 1, "block_h": 1, "head_split": 2, "num_warps": 1, "num_stages": 1}


def test_the_pool_runs_each_config_once_and_survives_signals_and_a_dead_worker(caplog):
    bad = {**GOOD, "block_t": 3}  # outside the space: reported when timed, skipped here
    with _InterpretingPrecompiler("cpu", workers=2) as precompiler:
        assert precompiler(TINY, [GOOD, bad, GOOD]) == 1
        assert precompiler(TINY, [GOOD]) == 0  # done before: nothing to do
        workers = list(precompiler._pool._processes.values())
        for worker in workers:  # Ctrl-C reaches the whole process group
            os.kill(worker.pid, signal.SIGINT)
        assert precompiler(TINY, [{**GOOD, "num_warps": 2}]) == 1
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].join(timeout=30)
        with caplog.at_level(logging.WARNING, logger="autotune.precompile"):
            assert precompiler(TINY, [{**GOOD, "num_warps": 4}]) == 0
        assert "a worker died" in caplog.text and precompiler._pool is None
        assert precompiler(TINY, [{**GOOD, "num_warps": 4}]) == 1  # a new pool


@pytest.mark.parametrize("overlap", [False, True])
def test_workers_that_compile_while_the_tuner_times_do_not_launch(monkeypatch, overlap):
    # Launching workers made the H200's timings read 2.5-7% faster; compile-only ones did not.
    pools = []

    class RecordingPrecompiler:
        def __init__(self, device, workers, launch=True):
            pools.append((str(device), workers, launch))

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

    # sys.modules: the package re-exports the function tune() under the module's name.
    monkeypatch.setattr(sys.modules["autotune.tune"], "TritonPrecompiler", RecordingPrecompiler)
    runner = SimpleNamespace(device=torch.device("cuda:0"), precompile=None, batch=1, overlap=False)
    with _ahead_of_time_compiling(runner, 4, overlap):
        assert isinstance(runner.precompile, RecordingPrecompiler)
        assert (runner.batch, runner.overlap) == (4, overlap)
    assert pools == [("cuda:0", 4, not overlap)]
    assert (runner.precompile, runner.batch, runner.overlap) == (None, 1, False)


@pytest.mark.parametrize("launch", [True, False])
def test_a_job_counts_what_it_compiled_with_or_without_launching(launch):
    bad = {**GOOD, "block_t": 3}
    job = (TINY.key, "cpu", [GOOD, bad, {**GOOD, "num_warps": 2}], triton_cache_dir(), launch)
    assert _compile_some(job) == 2


def test_compile_without_launch_leaves_the_arguments_alone(monkeypatch):
    launcher = get_provider("triton").bound(TINY, GOOD)
    inputs = make_inputs(TINY, 5, "cpu", generator=torch.Generator().manual_seed(0))
    before = inputs.qkv.clone()
    launcher.compile(*inputs.args)
    assert torch.equal(inputs.qkv, before)  # nothing ran
    launcher(*inputs.args)
    assert not torch.equal(inputs.qkv, before)  # while a call rotates them


@pytest.mark.gpu
def test_a_compile_without_launch_is_what_the_first_call_loads(monkeypatch, tmp_path):
    # Host tensors, no launch: the timing process's first call on device tensors of the same
    # layout must find the kernel in the cache (no new kernel entry), and compute the right
    # result. Loading it adds the driver's launcher stub to the cache, which no compile builds.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    spec = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)  # Llama-3-8B
    config = {"block_t": 2, "block_h": 2, "head_split": 8, "num_warps": 2, "num_stages": 2}
    assert precompile_triton(spec, [config], "cuda:0", workers=1, launch=False) == 1
    kernels = sorted(p.parent.name for p in tmp_path.glob("*/_rope_kernel.json"))
    assert len(kernels) == 1
    fn = get_provider("triton").bound(spec, config)
    check_correct(fn, spec, 101, "cuda:0", seed=0)
    assert sorted(p.parent.name for p in tmp_path.glob("*/_rope_kernel.json")) == kernels


def test_workers_compile_into_the_cache_directory_the_tuner_reads_now(monkeypatch, tmp_path):
    # Inductor repoints TRITON_CACHE_DIR the first time torch.compile compiles; workers started
    # before that must still fill the directory the tuning process loads kernels from.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "at_start"))
    assert triton_cache_dir() == str(tmp_path / "at_start")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "inductor"))
    now = triton_cache_dir()
    assert now == str(tmp_path / "inductor")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "worker_started_with"))
    assert _compile_some((TINY.key, "cpu", [], now, True)) == 0
    assert os.environ["TRITON_CACHE_DIR"] == now and triton_cache_dir() == now


@pytest.mark.parametrize(
    ("device", "cores", "processes", "expected"),
    [
        ("cpu", 16, 1, 0),  # nothing to compile ahead off CUDA
        ("cuda:0", 16, 1, 15),  # one core stays with the timing process
        ("cuda:0", 64, 1, 16),  # no more workers than trials in a batch
        ("cuda:0", 16, 2, 7),  # --devices: the spare cores shared among the processes
        ("cuda:0", 1, 1, 0),
    ],
)
def test_default_compile_workers(monkeypatch, device, cores, processes, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_compile_workers(device, processes) == expected


_ORPHANING_TUNER = """
import time, torch
from autotune.precompile import TritonPrecompiler
from kernels import RopeSpec

class Interpreting(TritonPrecompiler):
    _compiles_here = True

if __name__ == "__main__":
    pool = Interpreting("cpu", workers=2)
    configs = [{**GOOD, "num_warps": w} for w in (1, 2)]
    pool(RopeSpec(16, 16, 2, 1, True, torch.float32), configs)
    print(*pool._pool._processes, flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_the_tuner_is_killed_outright(tmp_path):
    script = tmp_path / "tuner.py"
    script.write_text(f"GOOD = {GOOD!r}\n{_ORPHANING_TUNER}")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    tuner = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in tuner.stdout.readline().split()]
        assert workers, "the pool started no worker"
        tuner.kill()  # SIGKILL: no chance to close the pool
        tuner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        tuner.kill()
        for pid in workers:  # a failed check leaves none behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) is gone too.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


class _RecordingAsyncCompiler:
    """Stands in for the pool with ``overlap``: records when each batch was handed over and
    when the runner waited for it, against the measurements made so far."""

    def __init__(self, storage, key):
        self.storage, self.key, self.events = storage, key, []

    def _measured(self):
        return len(_measured(_trials(self.storage, self.key)))

    def submit(self, spec, configs):
        assert spec == TINY and configs and all(not config_problems(spec, c) for c in configs)
        number = len([e for e in self.events if e[0] == "submit"])
        self.events.append(("submit", number, self._measured()))
        return _Waited(self, number)


class _Waited:
    def __init__(self, compiler, number):
        self.compiler, self.number = compiler, number

    def wait(self):
        self.compiler.events.append(("wait", self.number, self.compiler._measured()))
        return 1


def test_with_overlap_the_next_batch_compiles_while_this_one_is_timed(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    key = _key()
    compiler = _RecordingAsyncCompiler(storage, key)
    runner = _runner(storage, trials=12, precompile=compiler, batch=3, overlap=True)
    assert runner.run(key)
    trials = _trials(storage, key)
    assert len([t for t in trials if t.user_attrs.get("outcome") in COUNTED_OUTCOMES]) == 12
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    measured = _measured(trials)
    assert len(measured) == len(set(measured))
    events = compiler.events
    waits = {n: m for kind, n, m in events if kind == "wait"}
    submits = {n: m for kind, n, m in events if kind == "submit"}
    assert set(waits) <= set(submits) and len(submits) >= 3
    # Batch n+1 is handed over after batch n's compiles are waited for and before any of
    # batch n is measured: the workers compile it while batch n is timed.
    overlapped = [n for n in submits if n - 1 in waits and submits[n] == waits[n - 1]]
    assert overlapped, events
    ordered = [(kind, n) for kind, n, _ in events]
    for n in overlapped:
        assert ordered.index(("submit", n)) == ordered.index(("wait", n - 1)) + 1


@pytest.mark.parametrize(("overlap", "ahead"), [(False, 0), (True, 3)])
def test_an_interrupt_mid_batch_fails_what_was_asked_and_resume_completes(tmp_path, overlap, ahead):
    storage = open_storage(tmp_path / "s.journal")
    key = _key()
    seen = []

    def stop_on_fifth(study, trial):
        seen.append(trial.number)
        if len(seen) == 5:
            raise KeyboardInterrupt

    compiler = _RecordingAsyncCompiler(storage, key) if overlap else lambda *_: None
    runner = _runner(storage, trials=10, precompile=compiler, batch=3, overlap=overlap)
    runner.callbacks = [stop_on_fifth]
    with pytest.raises(KeyboardInterrupt):
        runner.run(key)
    trials = _trials(storage, key)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The five that ran keep their outcome. The rest of their batch (and, with overlap, the
    # batch asked ahead: 3 measurements and any invalid asks) are failed unmeasured, so the
    # sampler asks anew on resume.
    told = [t.number for t in trials if "outcome" in t.user_attrs]
    assert len(told) == 5
    failed = [t for t in trials if t.state == TrialState.FAIL and "outcome" not in t.user_attrs]
    assert len(failed) == len(trials) - 5
    assert all(t.number > max(told) for t in failed)  # asked after them, never run
    assert len(failed) >= ahead

    runner.callbacks = []
    assert runner.run(key)
    trials = _trials(storage, key)
    measured = _measured(trials)
    assert len(measured) == len(set(measured)), "a candidate was measured twice"
    assert len([t for t in trials if t.user_attrs.get("outcome") in COUNTED_OUTCOMES]) == 10
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_two_batches_in_flight_compile_a_shared_config_once():
    with _InterpretingPrecompiler("cpu", workers=2) as precompiler:
        first = precompiler.submit(TINY, [GOOD, {**GOOD, "num_warps": 2}])
        second = precompiler.submit(TINY, [GOOD, {**GOOD, "num_warps": 4}])  # GOOD is started
        assert (first.wait(), second.wait()) == (2, 1)
        assert precompiler(TINY, [GOOD, {**GOOD, "num_warps": 4}]) == 0
