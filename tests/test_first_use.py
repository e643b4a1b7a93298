"""Tuning on first use, on the CPU: candidates gated then timed, the fastest passing one kept
and persisted for the next selector, nothing tuned inside CUDA graph capture or torch.compile
tracing, one tuning when two processes (or threads) select the same spec at once, the switch
by argument and by environment variable (and so in the vLLM plugin and the transformers
adapter, which build their selectors themselves)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    FILE,
    GPUS,
    ROOT,
    TINY,
    entry,
    make_table,
    perf_model_data,
    put,
    put_device_table,
    put_model,
)

import kernels.table as table_mod
from kernels import Provider, RopeTableWarning, get_provider, select_rope
from kernels import first_use as fu
from kernels.measure import Timing, make_inputs
from kernels.providers import TRITON
from kernels.providers._torch import TorchProvider
from kernels.table import device_table_name, read_table
from kernels.testing import assert_rope_close, rope_reference

# TINY as select_rope's arguments.
ARGS = (TINY.head_size, TINY.rotary_dim, TINY.num_heads, TINY.num_kv_heads, TINY.is_neox,
        TINY.dtype)  # fmt: skip
QUICK_BUCKETS = (1, 4, 16)


@pytest.fixture
def timings(monkeypatch):
    """First use on tiny buckets, timing only the ``torch`` provider (and providers a test
    registers) with the real timer; returns the list of (callable, tokens) timed."""
    monkeypatch.delenv(fu.TUNE_ENV, raising=False)
    monkeypatch.setattr(fu, "BUCKETS", QUICK_BUCKETS)
    monkeypatch.setattr(fu, "NOT_TIMED_ON", {"cpu": ("torch_compile", TRITON)})
    timed: list[tuple[object, int]] = []
    real = fu.time_rope

    def counted(fn, spec, tokens, device, **kwargs):
        timed.append((fn, tokens))
        return real(fn, spec, tokens, device, **kwargs)

    monkeypatch.setattr(fu, "time_rope", counted)
    return timed


def _fn(name: str, config: dict | None = None):
    return get_provider(name).callable_for(TINY, config or {})


def _runs_correctly(rope, tokens: int) -> None:
    inputs = make_inputs(TINY, tokens, "cpu", generator=torch.Generator().manual_seed(tokens))
    expected_q, expected_k = rope_reference(*inputs.args, TINY.head_size, TINY.is_neox)
    rope(*inputs.args)
    assert_rope_close(inputs.query, expected_q, TINY.dtype, "query")
    assert_rope_close(inputs.key, expected_k, TINY.dtype, "key")


@dataclass(frozen=True)
class TwinProvider(TorchProvider):
    """A second correct provider: the torch math under another name."""

    name: str = "torch_twin"
    reference: bool = False


@dataclass(frozen=True)
class WrongProvider(Provider):
    """Does nothing at all: the fastest provider there is, and wrong."""

    name: str = "wrong_fast"
    description: str = "leaves query and key as they are"

    def build(self, spec, config):
        def run(positions, query, key, cos_sin_cache):
            return None

        return run


# -- the flow ------------------------------------------------------------------------------------


def test_first_use_tunes_persists_and_the_next_selector_reads_it(dirs, timings):
    rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert sorted(tokens for _, tokens in timings) == list(QUICK_BUCKETS)  # torch, per bucket
    table = read_table(dirs["user"] / FILE)
    entries = table["entries"]["graph"][TINY.key]
    assert sorted(map(int, entries)) == list(QUICK_BUCKETS)
    for record in entries.values():
        assert record["provider"] == "torch"
        assert record["providers_us"] == {"torch": record["median_us"]}
    explained = rope.explain(4)
    assert explained.source == dirs["user"] / FILE and explained.spec_key == TINY.key
    assert "tuned on first use by this process" in explained.why
    assert str(dirs["user"] / FILE) in explained.why
    for tokens in (1, 5, 16):
        _runs_correctly(rope, tokens)

    timings.clear()
    again = select_rope(*ARGS, "cpu", tune="first-use")
    assert timings == []  # read, not tuned again
    assert "first-use tuning not needed" in again.explain(4).why
    plain = select_rope(*ARGS, "cpu")  # tuning off: the persisted entries serve as well
    assert plain.explain(16).source == dirs["user"] / FILE
    assert "first-use" not in plain.explain(16).why


def test_the_fastest_passing_candidate_wins_each_bucket(dirs, timings, registered, monkeypatch):
    registered(TwinProvider())
    speed = {id(_fn("torch")): 5.0, id(_fn("torch_twin")): 3.0}

    def timer(fn, spec, tokens, device, **kwargs):
        us = speed[id(fn)] + (10.0 if tokens == 4 and speed[id(fn)] == 3.0 else 0.0)
        return Timing(us * 0.99, us, us * 1.01)

    monkeypatch.setattr(fu, "time_rope", timer)
    select_rope(*ARGS, "cpu", tune="first-use")
    entries = read_table(dirs["user"] / FILE)["entries"]["graph"][TINY.key]
    assert {b: e["provider"] for b, e in entries.items()} == {
        "1": "torch_twin", "4": "torch", "16": "torch_twin"}  # fmt: skip
    assert entries["4"]["providers_us"] == {"torch": 5.0, "torch_twin": 13.0}
    assert entries["1"]["median_us"] == 3.0 and entries["1"]["p20_us"] == pytest.approx(2.97)


def test_a_wrong_candidate_is_never_timed_never_wins_and_is_not_persisted(
    dirs, timings, registered
):
    wrong = registered(WrongProvider())
    result = fu.tune_spec(TINY, torch.device("cpu"), buckets=QUICK_BUCKETS)
    assert any(f.startswith("wrong_fast") and "wrong result" in f for f in result.failed)
    assert wrong.callable_for(TINY, {}) not in [fn for fn, _ in timings]
    rope = select_rope(*ARGS, "cpu", tune="first-use")
    entries = read_table(dirs["user"] / FILE)["entries"]["graph"][TINY.key]
    for record in entries.values():
        assert record["provider"] == "torch" and "wrong_fast" not in record["providers_us"]
    for tokens in QUICK_BUCKETS:
        assert rope.explain(tokens).provider == "torch"


def test_no_passing_candidate_writes_nothing_and_says_so(dirs, timings, monkeypatch):
    def fails(*args, **kwargs):
        raise AssertionError("query: every element off")

    monkeypatch.setattr(fu, "check_correct", fails)
    with pytest.warns(RopeTableWarning, match="no tuning table entry"):
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert timings == [] and not (dirs["user"] / FILE).exists()
    assert "first-use tuning found no candidate that passes" in rope.explain(1).why
    assert rope.explain(1).source is None  # the fallback


def test_candidates_are_the_default_and_the_models_best_configs_without_repeats(dirs, monkeypatch):
    put_model(dirs["env"], perf_model_data(torch_log_us=3.0, triton_log_us=1.0))
    monkeypatch.setattr(fu, "NOT_TIMED_ON", {})
    from kernels.perf_model import find_model

    model = find_model(None, torch.device("cpu"))
    got = fu.candidates(TINY, 64, torch.device("cpu"), model, model_configs=3)
    triton = get_provider(TRITON)
    expected = [triton.check_config(TINY, triton.default_config(TINY, 64))]
    for config in model.rank_configs(TRITON, TINY, 64, 3):
        if triton.check_config(TINY, config) not in expected:
            expected.append(triton.check_config(TINY, config))
    assert len(expected) >= 3  # the model brings configs of its own
    assert sorted(c.provider for c in got if c.provider != TRITON) == ["torch", "torch_compile"]
    assert [dict(c.config) for c in got if c.provider == TRITON] == expected
    without_model = fu.candidates(TINY, 64, torch.device("cpu"), None)
    assert sorted(c.provider for c in without_model) == ["torch", "torch_compile", TRITON]


def test_the_buckets_are_the_tuners_default_buckets():
    from autotune.models import DEFAULT_TOKENS

    assert DEFAULT_TOKENS == fu.BUCKETS


# -- when not to tune ----------------------------------------------------------------------------


def test_an_exact_entry_is_used_without_tuning(dirs, timings):
    put(dirs["shipped"], make_table({TINY.key: {"8": entry("torch", median=2.0)}}))
    rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert timings == [] and not (dirs["user"] / FILE).exists()
    assert rope.explain(8).source == dirs["shipped"] / FILE
    assert "first-use tuning not needed" in rope.explain(8).why


def test_a_nearest_spec_is_not_an_entry_for_this_spec(dirs, timings):
    other = "q4_kv2_d16_r16_neox_float32"  # same head size, rotary dim, style and dtype
    put(dirs["shipped"], make_table({other: {"8": entry("torch", median=2.0)}}))
    rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert sorted(tokens for _, tokens in timings) == list(QUICK_BUCKETS)
    assert rope.explain(4).spec_key == TINY.key


@pytest.mark.parametrize("inside", ["capture", "tracing"])
def test_nothing_is_tuned_inside_graph_capture_or_compile_tracing(
    dirs, timings, monkeypatch, inside
):
    if inside == "capture":
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        expected = "inside CUDA graph capture"
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        expected = "inside torch.compile tracing"
    assert fu.blocked_reason() == expected
    with pytest.warns(RopeTableWarning, match="no tuning table entry"):
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert timings == [] and not (dirs["user"] / FILE).exists()
    assert f"first-use tuning skipped: {expected}" in rope.explain(4).why
    assert rope.explain(4).provider == "torch"  # the normal selection: the fallback


def test_not_blocked_outside_capture_and_tracing():
    assert fu.blocked_reason() is None


def test_an_unwritable_directory_tunes_for_this_process_alone(
    dirs, timings, monkeypatch, read_only_dir
):
    monkeypatch.setattr(table_mod, "user_config_dir", lambda: read_only_dir)
    with pytest.warns(RopeTableWarning, match="not written"):
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert len(timings) == len(QUICK_BUCKETS)
    assert "tuned on first use by this process" in rope.explain(4).why
    assert "not written" in rope.explain(4).why
    assert rope.explain(4).spec_key == TINY.key  # the in-memory entries serve
    _runs_correctly(rope, 4)
    assert not list(read_only_dir.iterdir())


def test_a_failing_tuning_never_raises(dirs, timings, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(fu, "tune_spec", broken)
    with pytest.warns(RopeTableWarning):
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert "first-use tuning failed: RuntimeError: device lost" in rope.explain(1).why


def test_table_dir_receives_the_entries(dirs, timings, tmp_path):
    mine = tmp_path / "mine"
    rope = select_rope(*ARGS, "cpu", tune="first-use", table_dir=mine)
    assert rope.explain(4).source == mine / FILE
    assert not (dirs["user"] / FILE).exists()
    timings.clear()
    select_rope(*ARGS, "cpu", tune="first-use", table_dir=mine)
    assert timings == []


# -- the switch ----------------------------------------------------------------------------------


def test_the_environment_variable_switches_it_on_and_the_argument_overrides_it(
    dirs, timings, monkeypatch
):
    with pytest.warns(RopeTableWarning):
        rope = select_rope(*ARGS, "cpu")  # unset: off
    assert timings == [] and "first-use" not in rope.explain(4).why
    monkeypatch.setenv(fu.TUNE_ENV, "first-use")
    rope = select_rope(*ARGS, "cpu", tune="off")  # (the no-table warning came once above)
    assert timings == [] and "first-use" not in rope.explain(4).why
    rope = select_rope(*ARGS, "cpu")
    assert len(timings) == len(QUICK_BUCKETS)
    assert "tuned on first use by this process" in rope.explain(4).why


@pytest.mark.parametrize("value", ["", "off", "OFF"])
def test_off_values_of_the_variable(monkeypatch, value):
    monkeypatch.setenv(fu.TUNE_ENV, value)
    assert fu.tune_mode(None) is None


def test_a_bad_variable_warns_and_is_off_a_bad_argument_raises(dirs, monkeypatch):
    monkeypatch.setenv(fu.TUNE_ENV, "always")
    with pytest.warns(RopeTableWarning, match="ROPE_AUTOTUNE_TUNE='always'"):
        assert fu.tune_mode(None) is None
    with pytest.raises(ValueError, match="tune: expected 'first-use', 'off' or None"):
        select_rope(*ARGS, "cpu", tune="yes")


def test_the_vllm_plugin_tunes_on_first_use_by_the_variable(dirs, timings, monkeypatch):
    from kernels.integrations import _vllm_calls

    monkeypatch.setenv(fu.TUNE_ENV, "first-use")
    sig = (*ARGS, torch.device("cpu"), None, False)  # no mRoPE sections
    monkeypatch.setattr(_vllm_calls, "_ROPES", {})
    rope = _vllm_calls.rope_for(*sig)
    assert len(timings) == len(QUICK_BUCKETS)
    assert "tuned on first use by this process" in rope.explain(4).why


@pytest.mark.slow
def test_the_transformers_adapter_tunes_on_first_use_by_the_variable(dirs, timings, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from kernels.integrations.transformers import patch_model

    monkeypatch.setenv(fu.TUNE_ENV, "first-use")
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with patch_model(model) as patch, torch.no_grad():
        model(input_ids=torch.arange(5)[None])
        assert patch.calls == 1
        (selector,) = patch.selectors()
    assert selector.spec == TINY  # 2 heads of 16, 1 key head, float32
    assert len(timings) == len(QUICK_BUCKETS)
    assert "tuned on first use" in selector.explain(5).why


# -- concurrency ---------------------------------------------------------------------------------


def test_two_threads_selecting_at_once_tune_once(dirs, timings, monkeypatch):
    tuners: set[int] = set()
    real = fu.time_rope

    def slow(fn, spec, tokens, device, **kwargs):
        tuners.add(threading.get_ident())
        time.sleep(0.05)  # the other thread arrives while this one tunes
        return real(fn, spec, tokens, device, **kwargs)

    monkeypatch.setattr(fu, "time_rope", slow)
    barrier = threading.Barrier(2)
    notes: list[str] = []

    def select() -> None:
        barrier.wait()
        notes.append(select_rope(*ARGS, "cpu", tune="first-use").explain(4).why)

    threads = [threading.Thread(target=select) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(tuners) == 1 and len(notes) == 2
    assert sum("tuned on first use by this process" in n for n in notes) == 1
    assert all(str(dirs["user"] / FILE) in n for n in notes)


def _select_in_child(user_dir: str, count_file: str, barrier, results) -> None:
    """One process of the two-process test: tiny buckets, torch only, each timing logged."""
    table_mod.user_config_dir = lambda: Path(user_dir)
    table_mod.shipped_config_dir = lambda: Path(user_dir) / "none"
    fu.BUCKETS = (1, 4)
    fu.NOT_TIMED_ON = {"cpu": ("torch_compile", TRITON)}
    real = fu.time_rope

    def logged(*args, **kwargs):
        with open(count_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the other process arrives while this one tunes
        return real(*args, **kwargs)

    fu.time_rope = logged
    barrier.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RopeTableWarning)
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    results.put((os.getpid(), rope.explain(4).why))


@pytest.mark.slow
def test_two_processes_selecting_at_once_tune_once(dirs, tmp_path, monkeypatch):
    monkeypatch.delenv(fu.TUNE_ENV, raising=False)
    count_file = tmp_path / "timings.log"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_select_in_child,
                        args=(str(dirs["user"]), str(count_file), barrier, results))
        for _ in range(2)
    ]  # fmt: skip
    for process in processes:
        process.start()
    got = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    tuners = count_file.read_text().split()
    assert len(set(tuners)) == 1 and len(tuners) == 2  # one process, two buckets
    notes = dict(got)
    assert "tuned on first use by this process" in notes[int(tuners[0])]
    (other,) = [n for pid, n in notes.items() if pid != int(tuners[0])]
    assert "by another process or thread" in other or "not needed" in other
    entries = read_table(dirs["user"] / FILE)["entries"]["graph"][TINY.key]
    assert sorted(map(int, entries)) == [1, 4]


# -- every CPU provider, for real ----------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_and_the_interpreted_triton_kernel_are_tuned_for_real(dirs, monkeypatch):
    """torch, torch_compile and Triton (interpreted; the model's best configs) all gated and
    timed; whatever wins is a valid entry that runs correctly."""
    monkeypatch.delenv(fu.TUNE_ENV, raising=False)
    monkeypatch.setattr(fu, "BUCKETS", (2, 8))
    monkeypatch.setattr(fu, "NOT_TIMED_ON", {})
    monkeypatch.setattr(fu, "MODEL_CONFIGS", 2)
    put_model(dirs["env"], perf_model_data(torch_log_us=3.0, triton_log_us=1.0))
    rope = select_rope(*ARGS, "cpu", tune="first-use")
    entries = read_table(dirs["user"] / FILE)["entries"]["graph"][TINY.key]
    assert sorted(map(int, entries)) == [2, 8]
    for record in entries.values():
        assert set(record["providers_us"]) == {"torch", "torch_compile", TRITON}
        assert record["median_us"] == min(record["providers_us"].values())
    for tokens in (2, 8):
        _runs_correctly(rope, tokens)
        assert "tuned on first use by this process" in rope.explain(tokens).why


@pytest.mark.slow
def test_the_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/first_use.py --cpu-smoke: first use on a tiny spec, its choices re-timed
    against a stand-in full table, the report and the CSV written."""
    out, table = tmp_path / "report.txt", tmp_path / "buckets.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "first_use.py"), "--cpu-smoke",
               "--out", str(out), "--csv", str(table)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    assert TINY.key in report and "first-use / full tuning over 2 buckets" in report
    rows = table.read_text().splitlines()
    assert rows[0].startswith("spec,bucket,") and len(rows) == 3


@pytest.mark.slow
def test_a_runtime_without_the_tuners_libraries_tunes_on_first_use(tmp_path):
    """A fresh process where Optuna, scikit-learn, matplotlib and tqdm cannot be imported,
    switched on by the variable alone, with the default buckets: torch and torch_compile timed
    at all 17, the table written to the user config directory."""
    code = textwrap.dedent(f"""
        import sys

        for name in ("optuna", "sklearn", "matplotlib", "tqdm"):
            sys.modules[name] = None  # as if not installed: importing it raises ImportError
        import warnings
        import torch
        from kernels import select_rope
        from kernels.table import read_table, user_config_dir
        warnings.simplefilter("ignore")
        rope = select_rope(*{ARGS!r}, "cpu")
        why = rope.explain(100).why
        assert "tuned on first use by this process" in why, why
        table = read_table(next(user_config_dir().glob("*.json")))
        entries = table["entries"]["graph"][{TINY.key!r}]
        print(sorted({{p for e in entries.values() for p in e["providers_us"]}}))
        print(sorted(map(int, entries)))
    """).replace("torch.float32", "'float32'")
    env = {k: v for k, v in os.environ.items() if k not in (table_mod.CONFIG_DIR_ENV,
                                                          "TRITON_INTERPRET")}  # fmt: skip
    env.update({"PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path / "config"),
                fu.TUNE_ENV: "first-use"})  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    timed, buckets = done.stdout.split("\n")[-3:-1]
    assert timed == str(["torch", "torch_compile"]) and buckets == str(list(fu.BUCKETS))


def test_another_devices_exact_entry_does_not_stop_first_use(dirs, timings, fake_gpu):
    fake_gpu("H100")  # no table of its own; the H200's has this very spec
    put_device_table(dirs["shipped"], "H200", {TINY.key: {"4": entry("torch", median=2.0)}})
    with pytest.warns(RopeTableWarning, match="table of NVIDIA H200"):
        rope = select_rope(*ARGS, "cpu", tune="first-use")
    assert sorted(tokens for _, tokens in timings) == list(QUICK_BUCKETS)
    own = dirs["user"] / device_table_name(GPUS["H100"]["device_name"])
    assert sorted(map(int, read_table(own)["entries"]["graph"][TINY.key])) == list(QUICK_BUCKETS)
    explained = rope.explain(4)
    assert explained.source == own
    assert "transferred" not in explained.why
