"""``benchmarks/journal_time.py``: a run's device time per op, from a fabricated journal."""

from __future__ import annotations

import io
import lzma
from datetime import datetime, timedelta, timezone

import optuna
from conftest import entry, load_benchmark, make_table
from optuna.trial import FrozenTrial, TrialState

journal_time = load_benchmark("journal_time")

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
ROPE = "q32_kv8_d128_r128_neox_bfloat16"
MROPE = "q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24"


def measured(number, begin, seconds, value=1.0, **attrs):
    """A complete, measured trial that started at ``begin`` and took ``seconds``."""
    return FrozenTrial(
        number=number,
        state=TrialState.COMPLETE,
        value=value,
        datetime_start=begin,
        datetime_complete=begin + timedelta(seconds=seconds),
        params={},
        distributions={},
        user_attrs={"outcome": "measured", "median_us": value, **attrs},
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def add_study(storage, name, spec, starts, step, target):
    """A study of ``spec`` with measured trials starting ``starts`` seconds after T0, each
    ``step`` seconds long."""
    study = optuna.create_study(storage=storage, study_name=name)
    for attr, value in {"spec": spec, "timing": "graph", "target": target}.items():
        study.set_user_attr(attr, value)
    for i, start in enumerate(starts):
        study.add_trial(measured(i, T0 + timedelta(seconds=start), step))


def test_time_per_op_and_stretches(tmp_path):
    path = tmp_path / "studies.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    add_study(storage, "a", ROPE, [0, 2.5, 5, 7.5], 2.5, 4)  # complete
    add_study(storage, "b", ROPE, [10, 13], 3, 4)  # started, not complete
    add_study(storage, "c", MROPE, [500, 504, 508, 512, 516], 4, 5)  # the next device call
    add_study(storage, "d", MROPE, [20, 520], 1, 2)  # stopped in the first call, resumed
    archive = tmp_path / "studies.journal.xz"
    archive.write_bytes(lzma.compress(path.read_bytes()))

    times = journal_time.op_times(journal_time.open_storage(path, create=False))
    rope, mrope = times[("rope", "graph")], times[("mrope", "graph")]
    assert (rope.studies, rope.complete, rope.trials) == (2, 1, 6)
    assert (mrope.studies, mrope.complete, mrope.trials) == (2, 2, 7)
    # The resumed study counts its two trials' 2 s, not the 500 s between the calls.
    assert abs(rope.seconds - 16) < 1e-6 and abs(mrope.seconds - 22) < 1e-6
    spans = rope.spans + mrope.spans
    assert journal_time.stretches(spans, 60) == [21, 21]  # one stretch per device call
    assert journal_time.stretches(spans, 1000) == [521]


def test_main_reads_an_xz_journal(tmp_path, capsys):
    path = tmp_path / "studies.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    add_study(storage, "a", MROPE, [0, 2, 4, 6], 2, 4)
    archive = tmp_path / "studies.journal.xz"
    archive.write_bytes(lzma.compress(path.read_bytes()))
    assert journal_time.main([str(archive)]) == 0
    out = capsys.readouterr().out
    assert "| mrope | graph | 1 / 1 | 4 | 8 | 8.00 | 0.50 |" in out
    assert "wall 8 s" in out


def add_phased(storage, name, spec, trials):
    """A study of ``spec`` with measured ``(provider, seconds long, phase_s)`` trials, one after
    another from T0."""
    study = optuna.create_study(storage=storage, study_name=name)
    for attr, value in {"spec": spec, "timing": "graph", "target": len(trials)}.items():
        study.set_user_attr(attr, value)
    begin = T0
    for i, (provider, seconds, phases) in enumerate(trials):
        study.add_trial(measured(i, begin, seconds, provider=provider, phase_s=phases))
        begin += timedelta(seconds=seconds)


def test_phases_per_op_and_provider(tmp_path, capsys):
    path = tmp_path / "studies.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    compiled = {"bind": 0.0, "gate": 0.6, "inputs": 0.01, "warmup": 0.01, "measure": 0.03}
    cached = {**compiled, "gate": 0.0004}
    add_phased(
        storage, "a", MROPE, [("triton_mrope", 0.7, compiled), ("triton_mrope", 0.1, cached)]
    )
    add_phased(storage, "b", ROPE, [("vllm", 0.05, {"gate": 0.0, "measure": 0.04})])
    times = journal_time.phase_times(storage)
    mrope = times[("mrope", "triton_mrope")]
    assert (mrope.trials, mrope.gate_runs) == (2, [0.6])  # the cached gate did not run the check
    assert abs(mrope.phases["gate"] - 0.6004) < 1e-9 and abs(mrope.wall - 0.8) < 1e-9
    assert times[("rope", "vllm")].trials == 1
    assert journal_time.main([str(path), "--phases"]) == 0
    out = capsys.readouterr().out
    # 0.8 s in trials, 0.7004 s in their phases: 0.1 s outside them.
    assert (
        "| mrope | triton_mrope | 2 | 1 | 0.600 | 0.0 | 0.6 | 0.0 | 0.0 | 0.1 | 0.1 | 0.400 |"
        in out
    )
    assert "| rope | vllm | 1 | 0 | 0.000 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.050 |" in out


def add_trials(storage, name, spec, tokens, trials):
    """A study of ``spec`` at ``tokens`` with measured ``(provider, config, median_us)`` trials."""
    study = optuna.create_study(storage=storage, study_name=name)
    for attr, value in {"spec": spec, "timing": "graph", "tokens": tokens}.items():
        study.set_user_attr(attr, value)
    for i, (provider, config, median) in enumerate(trials):
        study.add_trial(measured(i, T0, 0, median, provider=provider, config=config))


def test_transfer_in_journal_scores_the_other_tables_choices(tmp_path):
    transfer = load_benchmark("experiments/transfer_in_journal")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j"))
    )
    fast, slow = {"block_h": 4}, {"block_h": 16}
    add_trials(storage, "a", ROPE, 16, [("triton", fast, 2.0), ("triton", slow, 2.5)])
    add_trials(storage, "b", ROPE, 256, [("triton", fast, 4.0), ("vllm", {}, 8.0)])
    add_trials(storage, "c", ROPE, 4096, [("triton", fast, 9.0)])  # the choice not measured
    add_trials(storage, "d", MROPE, 16, [("torch", {}, 1.0)])  # no entry in the table
    table = make_table(
        {ROPE: {"16": entry("triton", slow, 1.0), "256": entry("vllm", None, 1.0),
                "4096": entry("flashinfer", None, 1.0)}}
    )  # fmt: skip
    rows, unmeasured = transfer.transfer_ratios(storage, table)
    assert sorted(rows) == [(ROPE, 16, "triton", 1.25), (ROPE, 256, "vllm", 2.0)]
    assert unmeasured == 1


def test_eta_replay_per_stretch_reads_the_bar(tmp_path):
    path = tmp_path / "studies.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # 40 trials of 2 s each, the second half in a later device call 1000 s on.
    add_study(storage, "a", ROPE, [2 * i for i in range(20)], 2, 20)
    add_study(storage, "b", ROPE, [1000 + 2 * i for i in range(20)], 2, 20)
    add_study(storage, "c", MROPE, [5000], 1, 1)  # another op: not in rope's replay
    stretches = journal_time.finish_times(storage, "rope", gap_s=60)
    assert stretches == [[2.0 * (i + 1) for i in range(20)]] * 2
    # At a constant rate the bar's estimate is the truth.
    for done, estimate, truth in journal_time.eta_replay(stretches[0], fractions=(0.25, 0.5)):
        assert done in (0.25, 0.5)
        assert abs(estimate - truth) < 1e-6 * truth
    # A run that slows down is underestimated by a rate-based bar; the replay shows it.
    slowing = [float(t) for t in range(1, 21)] + [20.0 + 4 * t for t in range(1, 21)]
    ((_, estimate, truth),) = journal_time.eta_replay(slowing, fractions=(0.5,))
    assert truth == 80 and estimate < 0.5 * truth


def test_the_bar_estimates_from_the_runs_average_rate():
    """One slow trial (a compile) among fast ones: the bar's time left follows the average
    since the start, not the last trials' rate."""
    from autotune.progress import new_bar

    now = [0.0]
    bar = new_bar(100, file=io.StringIO())
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = 0.0
    for n in range(1, 51):
        now[0] = n * 1.0 + (20.0 if n == 50 else 0.0)  # the 50th trial took 21 s
        bar.update(1)
    rate = bar.format_dict["rate"] or bar.n / now[0]
    assert abs(50 / rate - 50 * 70 / 50) < 1e-6  # 50 left at 50 trials in 70 s
