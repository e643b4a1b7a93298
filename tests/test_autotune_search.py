"""Real searches on the CPU (torch, and triton under the interpreter) with tiny shapes: the
candidates, the correctness gate, failures that never win, the table, and resuming."""

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna
import pytest
import torch
from conftest import CPU_TABLE, QUICK, ROOT, TINY, TINY_GPTJ
from optuna.trial import TrialState

from autotune import open_storage, tune
from autotune.export import build_tables
from autotune.objective import Objective
from autotune.runner import StudyRunner
from autotune.space import CandidateSpace
from autotune.studies import StudyKey, is_counted
from kernels import RopeSpec, get_provider
from kernels.providers import Provider
from kernels.providers._triton import PARAM_SPACE, config_problems
from kernels.table import device_metadata, device_table_name, read_table


def all_trials(storage):
    """Trials per study (claims are not studies: see autotune.distributed)."""
    return {
        s.study_name: storage.get_all_trials(s._study_id, deepcopy=False)
        for s in storage.get_all_studies()
    }


def measured_keys(trials):
    return [
        (t.user_attrs["provider"], tuple(sorted(t.user_attrs["config"].items())))
        for t in trials
        if t.user_attrs.get("outcome") == "measured"
    ]


# -- the candidate space -------------------------------------------------------------------------


def test_candidate_space_lists_valid_configs_defaults_first():
    space = CandidateSpace.build(TINY, ["triton", "torch", "vllm"], "cpu")
    assert space.providers == ("torch", "triton")  # vllm does not run on the CPU
    assert space.tunable == ("triton",)
    assert [c.provider for c in space.valid[:2]] == ["torch", "triton"]
    assert space.valid[1].config == get_provider("triton").default_config(TINY)
    triton = [c.config for c in space.valid if c.provider == "triton"]
    expected = [
        dict(zip(PARAM_SPACE, values, strict=True))
        for values in itertools.product(*PARAM_SPACE.values())
    ]
    expected = [c for c in expected if not config_problems(TINY, c)]
    assert len(triton) == len(expected) and all(c in triton for c in expected)
    assert len({c.key for c in space.valid}) == len(space.valid)


def test_candidate_params_round_trip():
    space = CandidateSpace.build(TINY_GPTJ, ["torch", "triton"], "cpu")
    for candidate in space.valid[:: max(1, len(space.valid) // 50)]:
        trial = optuna.trial.FixedTrial(space.params(candidate))
        trial.set_user_attr("enqueued", True)
        assert space.suggest(trial) == candidate
    # Ordered numeric values are sampled by index: the sampler sees their order.
    params = space.params(space.valid[1])
    assert params["triton.block_t"] == PARAM_SPACE["block_t"].index(
        space.valid[1].config["block_t"]
    )


def test_no_provider_for_the_device():
    with pytest.raises(ValueError, match="providers: none can run"):
        CandidateSpace.build(TINY, ["vllm", "flashinfer"], "cpu")


def test_a_provider_for_another_layout_is_not_probed(monkeypatch):
    """Probing vllm_mrope imports vLLM's rotary layers (seconds): a RoPE spec never asks."""
    from kernels.providers._vllm_mrope import VllmMropeProvider

    def probe(self, device):
        raise AssertionError("vllm_mrope probed for a RoPE spec")

    monkeypatch.setattr(VllmMropeProvider, "unavailable_reason", probe)
    space = CandidateSpace.build(TINY, ["torch", "vllm_mrope"], "cpu")
    assert space.providers == ("torch",)


def test_study_keys_name_deterministically_and_record_themselves():
    key = StudyKey.current("NVIDIA H200", "graph", TINY, 16, ["triton", "torch"])
    revision = get_provider("triton").revision
    assert revision > 1  # a stale study of an older kernel is not resumed
    assert key.name == f"rope:NVIDIA_H200:graph:{TINY.key}:16:torch+triton@{revision}"
    assert key == StudyKey.current("NVIDIA H200", "graph", TINY, 16, ["torch", "triton"])
    assert key.name != StudyKey.current("NVIDIA H200", "eager", TINY, 16, ["torch"]).name
    assert StudyKey.from_attrs(key.attrs({"device_name": "NVIDIA H200"})) == key
    # Not a rope-autotune study: another tool's, or a claim marker of an older version.
    assert StudyKey.from_attrs({"worker": "w", "heartbeat": 1.0}) is None


def test_stale_providers_are_read_from_the_recorded_revisions():
    key = StudyKey.current("NVIDIA H200", "graph", TINY, 16, ["triton", "torch"])
    assert key.stale() == []

    def recorded(**revisions):
        attrs = key.attrs({})
        attrs["revisions"] = {**attrs["revisions"], **revisions}
        return StudyKey.from_attrs(attrs)

    assert recorded(triton=2).stale() == ["triton@2"]
    assert recorded(torch=2).stale() == ["torch@2"]  # a newer one too
    assert recorded(gone=1).stale() == ["gone@1"]  # no longer registered


# -- a real search -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_search_on_cpu(tmp_path):
    storage = tmp_path / "studies.journal"
    table = tune(
        [TINY, TINY_GPTJ], [1, 9], device="cpu", providers=["torch", "triton"], trials=3,
        storage=storage, output=tmp_path / "out", save_path=tmp_path / "csv", seed=0,
        progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    entries = table["entries"]["graph"]
    assert set(entries) == {TINY.key, TINY_GPTJ.key}
    for spec in (TINY, TINY_GPTJ):
        assert set(entries[spec.key]) == {"1", "9"}
        for entry in entries[spec.key].values():
            assert set(entry["providers_us"]) == {"torch", "triton"}
            assert entry["median_us"] == min(entry["providers_us"].values())
            assert entry["providers_us"][entry["provider"]] == entry["median_us"]
            assert entry["p20_us"] <= entry["median_us"] <= entry["p80_us"]
            if entry["provider"] == "triton":
                assert not config_problems(spec, entry["config"])
    written = read_table(tmp_path / "out" / CPU_TABLE)
    assert written["entries"] == table["entries"]
    assert written["metadata"]["device_name"] == table["metadata"]["device_name"]

    trials = all_trials(open_storage(storage))
    assert len(trials) == 4  # one study per spec and bucket
    for name, study_trials in trials.items():
        counted = [t for t in study_trials if is_counted(t)]
        assert len(counted) == 3, name
        assert len(set(measured_keys(study_trials))) == len(measured_keys(study_trials))
        # The first trials are every provider's default.
        assert {t.user_attrs["provider"] for t in study_trials[:2]} == {"torch", "triton"}
        for t in study_trials:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED), (name, t)
            if t.user_attrs["outcome"] == "invalid":
                assert t.state == TrialState.PRUNED and "config" in t.user_attrs["error"]
    csv_rows = (tmp_path / "csv" / CPU_TABLE.replace(".json", ".csv")).read_text().splitlines()
    assert len(csv_rows) == 1 + sum(len(t) for t in trials.values())


@dataclass(frozen=True)
class _NoOpProvider(Provider):
    """Returns at once without rotating: faster than any real kernel, and wrong."""

    name: str = "test_noop"
    description: str = "does nothing (a wrong result)"

    def build(self, spec, config):
        return lambda positions, query, key, cos_sin_cache: None


@dataclass(frozen=True)
class _FailingProvider(Provider):
    """Fails at its first launch, as a kernel that does not compile does."""

    name: str = "test_failing"
    description: str = "raises at launch"

    def build(self, spec, config):
        def run(positions, query, key, cos_sin_cache):
            raise RuntimeError("CompilationError: out of shared memory")

        return run


@pytest.fixture
def broken_providers(registered):
    return [registered(_NoOpProvider()).name, registered(_FailingProvider()).name]


def test_failed_candidates_are_recorded_and_never_win(tmp_path, broken_providers):
    storage = open_storage(tmp_path / "s.journal")
    table = tune(
        [TINY], [4], device="cpu", providers=["torch", *broken_providers], trials=8,
        storage=storage, progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    entry = table["entries"]["graph"][TINY.key]["4"]
    assert entry["provider"] == "torch" and set(entry["providers_us"]) == {"torch"}
    (trials,) = all_trials(storage).values()
    # A space of three untunable providers fits the budget: each measured once, no sampling.
    assert len(trials) == 3
    by_provider = {t.user_attrs["provider"]: t for t in trials}
    noop, failing = by_provider["test_noop"], by_provider["test_failing"]
    assert noop.state == TrialState.FAIL and noop.user_attrs["outcome"] == "wrong"
    assert noop.user_attrs["error"].startswith("wrong result")
    assert failing.state == TrialState.FAIL and failing.user_attrs["outcome"] == "error"
    assert "out of shared memory" in failing.user_attrs["error"]


# -- resuming ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_interrupt(tmp_path):
    storage_path = tmp_path / "s.journal"
    calls = {"counted": 0}

    def interrupt_on_fourth(study, trial):
        calls["counted"] += is_counted(trial)
        if calls["counted"] == 4:
            raise KeyboardInterrupt

    kwargs = dict(
        device="cpu", providers=["torch", "triton"], trials=3, storage=storage_path,
        output=tmp_path / "out", seed=1, progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        tune([TINY], [1, 9], callbacks=[interrupt_on_fourth], **kwargs)
    # What finished was written: the first bucket's study only.
    partial = read_table(tmp_path / "out" / CPU_TABLE)
    assert set(partial["entries"]["graph"][TINY.key]) == {"1"}
    before = all_trials(open_storage(storage_path))
    measured_before = {n: measured_keys(t) for n, t in before.items()}
    assert sum(map(len, measured_before.values())) in (3, 4)

    table = tune([TINY], [1, 9], **kwargs)
    assert set(table["entries"]["graph"][TINY.key]) == {"1", "9"}
    after = all_trials(open_storage(storage_path))
    for name, trials in after.items():
        keys = measured_keys(trials)
        assert len(keys) == len(set(keys)), "a candidate was measured twice"
        # Nothing measured before was measured again: earlier trials are kept as they were.
        assert keys[: len(measured_before.get(name, []))] == measured_before.get(name, [])
        assert len([t for t in trials if is_counted(t)]) == 3
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # A third run has nothing left to do and measures nothing.
    tune([TINY], [1, 9], **kwargs)
    assert {n: len(t) for n, t in all_trials(open_storage(storage_path)).items()} == {
        n: len(t) for n, t in after.items()
    }


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    argv = [
        sys.executable, "-m", "autotune", "--device", "cpu", "--head-size", "16",
        "--num-heads", "2", "--num-kv-heads", "1", "--dtype", "fp32", "--tokens", "1,3",
        "--providers", "torch,triton", "--trials", "3", "--storage", str(tmp_path / "s.journal"),
        "--output", str(tmp_path / "out"), "--seed", "0", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    storage = tmp_path / "s.journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first trials
        if storage.exists() and storage.stat().st_size > 3000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
    trials = all_trials(open_storage(storage))
    assert not [t for ts in trials.values() for t in ts if t.state == TrialState.RUNNING]

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = read_table(tmp_path / "out" / CPU_TABLE)
    assert set(table["entries"]["graph"][TINY.key]) == {"1", "3"}
    for trials in all_trials(open_storage(storage)).values():
        keys = measured_keys(trials)
        assert len(keys) == len(set(keys))
        assert len([t for t in trials if is_counted(t)]) == 3
    assert build_tables(open_storage(storage))["CPU x86_64"]["entries"] == table["entries"]


@pytest.mark.gpu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_gpu_run_stopped_like_timeout_does_writes_its_table(tmp_path, sig):
    """``timeout -s INT`` signals the run's process group once every provider's library is
    loaded (the first study measures each provider's default first): the run still finishes
    its trial, writes what is complete and exits 130."""
    storage = tmp_path / "s.journal"
    argv = [
        sys.executable, "-m", "autotune", "--device", "cuda:0", "--model", "llama-3-70b",
        "--tensor-parallel-size", "8", "--dtype", "bf16", "--tokens", "1,16,256,4096",
        "--trials", "12", "--storage", str(storage), "--output", str(tmp_path / "out"),
        "--seed", "0", "--quiet",
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        argv, env={**os.environ, "PYTHONPATH": path}, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, signalled as a whole like timeout does
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if storage.exists():
            studies = [t for ts in all_trials(open_storage(storage)).values() for t in ts]
            if sum(t.state == TrialState.COMPLETE for t in studies) >= 16:  # a study and more
                break
        time.sleep(0.5)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be stopped")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
    (path,) = (tmp_path / "out").glob("*.json")
    assert read_table(path)["entries"]["graph"]
    trials = all_trials(open_storage(storage))
    assert not [t for ts in trials.values() for t in ts if t.state == TrialState.RUNNING]


@pytest.mark.gpu
@pytest.mark.parametrize("distributed", [False, True], ids=["in-process", "worker-process"])
def test_short_real_tuning_run_on_the_gpu(tmp_path, distributed):
    """Every available provider, graph and eager timing, the one-GPU path both in-process and
    through the worker-process (distributed) code path."""
    spec = RopeSpec(128, 128, 8, 1, True, torch.bfloat16)  # Llama-3 70B at TP 8
    where = {"devices": ["cuda:0"]} if distributed else {"device": "cuda:0"}
    table = tune(
        [spec], [1, 4096], trials=12, timing=["graph", "eager"], storage=tmp_path / "s.journal",
        output=tmp_path / "out", seed=0, progress=False, **where,
    )  # fmt: skip
    for timing in ("graph", "eager"):
        for entry in table["entries"][timing][spec.key].values():
            assert entry["median_us"] == min(entry["providers_us"].values())
            assert {"torch", "triton"} <= set(entry["providers_us"])
    name = device_table_name(torch.cuda.get_device_properties(0).name)
    assert read_table(tmp_path / "out" / name)["entries"] == table["entries"]


@dataclass(frozen=True)
class _TorchTwinProvider(Provider):
    """A correct untunable provider that a study did not have: PyTorch's op under a new name."""

    name: str = "test_torch_twin"
    description: str = "the torch provider again"

    def build(self, spec, config):
        return get_provider("torch").callable_for(spec, {})


@pytest.fixture
def twin_provider(registered):
    return registered(_TorchTwinProvider()).name


@pytest.mark.slow
def test_adding_an_untunable_provider_measures_it_alone(tmp_path, twin_provider):
    storage = open_storage(tmp_path / "s.journal")
    kwargs = dict(device="cpu", storage=storage, seed=3, progress=False, time_kwargs=QUICK)
    tune([TINY], [4], providers=["torch"], trials=4, **kwargs)
    tune([TINY], [4], providers=["torch", "triton"], trials=4, **kwargs)
    before = all_trials(storage)
    runner = StudyRunner(storage, Objective(torch.device("cpu")), device_metadata("cpu"), 4)
    (donor,) = [n for n in before if n == runner.key("graph", TINY, 4, ["torch", "triton"]).name]
    # Before the run, the progress count knows the copies will fill the budget: one trial left.
    space = runner.space(TINY, ["torch", "triton", twin_provider])
    assert runner.remaining(runner.key("graph", TINY, 4, space.providers)) == 1

    table = tune([TINY], [4], providers=["torch", "triton", twin_provider], trials=4, **kwargs)
    after = all_trials(storage)
    (name,) = set(after) - set(before)
    study = optuna.load_study(study_name=name, storage=storage)
    # The larger of the two studies over fewer providers is copied; only the twin is new.
    assert study.user_attrs["warm_started_from"] == donor
    assert measured_keys(after[name]) == [*measured_keys(before[donor]), (twin_provider, ())]
    assert twin_provider in table["entries"]["graph"][TINY.key]["4"]["providers_us"]

    # A larger budget resumes the search in the copied study (the copies count: 5 of 6), and
    # its widened provider choices are compatible with them.
    tune([TINY], [4], providers=["torch", "triton", twin_provider], trials=6, **kwargs)
    keys = measured_keys(all_trials(storage)[name])
    assert len(keys) == 6 and len(set(keys)) == 6 and keys[5][0] == "triton"


def test_measured_trials_record_where_their_time_went(tmp_path):
    storage = open_storage(tmp_path / "s.journal")
    tune(
        [TINY], [5], device="cpu", providers=["torch", "triton"], trials=3, storage=storage,
        progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    (trials,) = all_trials(storage).values()
    measured = [t for t in trials if t.user_attrs.get("outcome") == "measured"]
    assert len(measured) == 3
    for trial in measured:
        phases = trial.user_attrs["phase_s"]
        assert set(phases) == {"bind", "gate", "inputs", "warmup", "measure"}
        assert all(v >= 0 for v in phases.values())
        # The phases are parts of the trial, so they cannot add up to more than it took.
        took = (trial.datetime_complete - trial.datetime_start).total_seconds()
        assert 0 < sum(phases.values()) <= took + 1e-3
