"""``python -m autotune verify`` on CPU tables: entries still right, slower and beaten, failing
(the winner or the runner-up; wrong always or only without a key), unavailable here, ``--fix``
re-tuning only the bad bucket, and tables that cannot be used (one line, status 2).

Recorded times are chosen so that no verdict depends on how fast this machine is: a right entry
records a time no re-timing reaches (1 s), a stale one a time none beats (1 us), and the slow
provider sleeps 5 ms per call, far above the torch provider's time on the tiny spec."""

import csv
import logging
import time
from dataclasses import dataclass

import orjson
import pytest
import torch
from conftest import CPU_TABLE, TINY, TINY_GPTJ, entry

from autotune import gate, verify
from autotune.cli import main
from autotune.verify import (
    BEATEN_MARGIN,
    SLOWER_MARGIN,
    Check,
    Contender,
    Verifier,
    plan_checks,
)
from kernels import get_provider
from kernels.measure import Timing
from kernels.providers._torch import TorchProvider
from kernels.table import device_metadata, empty_table, read_table, write_table

CPU = torch.device("cpu")
NEVER_REACHED_US = 1e6  # a right entry's recorded time: any re-timing is faster
UNBEATABLE_US = 1.0  # a stale entry's recorded time: any re-timing is slower


@dataclass(frozen=True)
class _SleepyTorch(TorchProvider):
    """torch, then a 5 ms sleep per call: slower than torch on any machine."""

    name: str = "test_sleepy"
    description: str = "torch, then a 5 ms sleep"

    def build(self, spec, config):
        run = super().build(spec, config)

        def sleepy(*args):
            run(*args)
            time.sleep(0.005)

        return sleepy


@dataclass(frozen=True)
class _WrongTorch(TorchProvider):
    """torch, then the query negated: in every call, or only in calls without a key."""

    name: str = "test_wrong"
    description: str = "torch with a sign error"
    keyless_only: bool = False

    def build(self, spec, config):
        run = super().build(spec, config)

        def wrong(positions, query, key, cos_sin_cache):
            run(positions, query, key, cos_sin_cache)
            if key is None or not self.keyless_only:
                query.neg_()

        return wrong


@dataclass(frozen=True)
class _Elsewhere(TorchProvider):
    """A provider that runs on no device here."""

    name: str = "test_elsewhere"
    description: str = "needs hardware this machine lacks"

    def unavailable_reason(self, device):
        return "needs the test accelerator"


@pytest.fixture
def sleepy(registered):
    return registered(_SleepyTorch()).name


def write_cpu_table(directory, entries, *, device_name=None):
    """``entries``: ``{timing: {spec: {tokens: entry}}}``, written as this CPU's table."""
    table = empty_table(device_metadata(CPU))
    if device_name is not None:
        table["metadata"]["device_name"] = device_name
    for timing, specs in entries.items():
        for spec, buckets in specs.items():
            table["entries"][timing][spec.key] = {str(t): e for t, e in buckets.items()}
    return write_table(directory / CPU_TABLE, table)


def run_verify(path, *flags):
    return main(["verify", "--device", "cpu", "--table", str(path), *flags])


def right(sleepy):
    return entry("torch", median=NEVER_REACHED_US, **{sleepy: 2 * NEVER_REACHED_US})


def beaten(sleepy):
    return entry(sleepy, median=UNBEATABLE_US, torch=NEVER_REACHED_US)


# -- verdicts ------------------------------------------------------------------------------------


def test_a_right_table_exits_0(tmp_path, sleepy, capsys):
    path = write_cpu_table(tmp_path, {
        "graph": {TINY: {1: right(sleepy), 64: right(sleepy)}, TINY_GPTJ: {7: right(sleepy)}},
        "eager": {TINY: {16: right(sleepy)}},
    })  # fmt: skip
    assert run_verify(path) == 0
    out = capsys.readouterr().out
    assert "4 of 4 verified entries still right" in out
    assert "now failing: 0; unavailable here: 0" in out


def test_a_beaten_winner_is_slower_and_beaten_exits_1(tmp_path, sleepy, capsys):
    path = write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy), 64: beaten(sleepy)}}})
    assert run_verify(path, "--save-path", str(tmp_path / "out")) == 1
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("graph")]
    assert TINY.key in row and " 64 " in row and "slower,beaten" in row
    assert f"{sleepy} {UNBEATABLE_US:.2f} -> " in row and "torch 1000000.00 -> " in row
    assert "1 of 2 verified entries still right" in out
    assert "more than 5%: 1;" in out and "more than 2% faster): 1;" in out
    assert "now failing: 0" in out
    rows = (tmp_path / "out" / f"{CPU_TABLE[:-5]}_verify.csv").read_text().splitlines()
    rows = list(csv.DictReader(rows))
    assert [(r["tokens"], r["role"], r["provider"]) for r in rows] == [
        ("1", "winner", "torch"), ("1", "runner-up", sleepy),
        ("64", "winner", sleepy), ("64", "runner-up", "torch"),
    ]  # fmt: skip
    assert all(float(r["median_us"]) > 0 for r in rows)
    assert [r["problems"] for r in rows] == ["", "", "slower,beaten", "slower,beaten"]


@pytest.mark.parametrize("keyless_only", [False, True], ids=["always", "without-key"])
@pytest.mark.parametrize("role", ["winner", "runner-up"])
def test_a_wrong_provider_is_failing(tmp_path, registered, sleepy, capsys, role, keyless_only):
    wrong = registered(_WrongTorch(keyless_only=keyless_only)).name
    bad = entry(wrong, median=NEVER_REACHED_US, torch=2 * NEVER_REACHED_US)
    if role == "runner-up":  # the selector's fallback must be right too
        bad = entry("torch", median=NEVER_REACHED_US, **{wrong: 2 * NEVER_REACHED_US})
    path = write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy), 8: bad}}})
    assert run_verify(path) == 1
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("graph")]
    assert " 8 " in row and "failing" in row
    assert f"    {role} {wrong}: wrong result" in out
    assert "1 of 2 verified entries still right" in out and "now failing: 1;" in out


def test_a_provider_that_raises_is_failing(tmp_path, registered, capsys):
    @dataclass(frozen=True)
    class _Raising(TorchProvider):
        name: str = "test_raising"
        description: str = "raises in every call"

        def build(self, spec, config):
            def fail(*args):
                raise RuntimeError("kernel launch failed")

            return fail

    name = registered(_Raising()).name
    path = write_cpu_table(tmp_path, {"graph": {TINY: {4: entry(name, median=NEVER_REACHED_US)}}})
    assert run_verify(path) == 1
    out = capsys.readouterr().out
    assert f"winner {name}: error: RuntimeError: kernel launch failed" in out


def test_providers_unavailable_here_are_skipped_and_counted(tmp_path, registered, capsys):
    elsewhere = registered(_Elsewhere()).name
    path = write_cpu_table(tmp_path, {"graph": {TINY: {
        1: entry("torch", median=NEVER_REACHED_US, **{elsewhere: UNBEATABLE_US}),
        2: entry(elsewhere, median=UNBEATABLE_US, torch=1.0),
    }}})  # fmt: skip
    assert run_verify(path, "--save-path", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "1 of 1 verified entries still right" in out
    assert "unavailable here: 1 winners (entry not verified), 1 runner-ups" in out
    assert f"  unavailable here: {elsewhere}: needs the test accelerator" in out
    rows = (tmp_path / f"{CPU_TABLE[:-5]}_verify.csv").read_text().splitlines()
    timed = [(r["tokens"], r["role"]) for r in csv.DictReader(rows) if r["median_us"]]
    assert timed == [("1", "winner")]


def test_problems_follow_the_margins():
    def check(recorded_us, winner_us, runner_up_us):
        c = Check("graph", TINY, 1, Contender("a", {}, recorded_us), Contender("b", {}, 1.0))
        c.winner_now = Timing(winner_us, winner_us, winner_us)
        c.runner_up_now = Timing(runner_up_us, runner_up_us, runner_up_us)
        return c.problems

    assert check(100.0, 100.0 * (1 + SLOWER_MARGIN) - 0.01, 200.0) == ()
    assert check(100.0, 100.0 * (1 + SLOWER_MARGIN) + 0.01, 200.0) == ("slower",)
    assert check(100.0, 50.0, 50.0 / (1 + BEATEN_MARGIN) + 0.01) == ()  # a lead within noise
    assert check(100.0, 50.0, 50.0 / (1 + BEATEN_MARGIN) - 0.01) == ("beaten",)
    assert check(100.0, 200.0, 100.0) == ("slower", "beaten")
    failing = Check("graph", TINY, 1, Contender("a", {}, 1.0), None, failures=["winner a: x"])
    assert failing.problems == ("failing",)


# -- what is checked -----------------------------------------------------------------------------


def test_plan_is_spec_major_filtered_and_names_the_runner_up(registered, sleepy):
    elsewhere = registered(_Elsewhere()).name
    table = empty_table(device_metadata(CPU))
    table["entries"]["graph"] = {
        TINY_GPTJ.key: {"8": right(sleepy)},
        TINY.key: {
            "64": entry("torch", median=5.0, triton=6.0, **{sleepy: 9.0}),
            "8": entry("torch", median=5.0, **{elsewhere: 5.5, sleepy: 9.0}),
        },
    }
    table["entries"]["eager"] = {TINY.key: {"2": right(sleepy)}}
    checks = plan_checks(table, CPU)
    # Spec-major (spec keys sorted), then timing mode, then tokens in numeric order.
    assert [(c.spec, c.timing, c.tokens) for c in checks] == [
        (TINY, "eager", 2), (TINY, "graph", 8), (TINY, "graph", 64), (TINY_GPTJ, "graph", 8),
    ]  # fmt: skip
    by_tokens = {(c.timing, c.tokens): c for c in checks if c.spec == TINY}
    # A runner-up that does not run here is skipped, not replaced: the winner is checked
    # against its record only.
    assert by_tokens["graph", 8].runner_up == Contender(elsewhere, {}, 5.5)
    assert by_tokens["graph", 8].unavailable == {
        "runner-up": f"{elsewhere}: needs the test accelerator"
    }
    # A tunable runner-up gets its default config for the spec and bucket, and says so.
    triton = by_tokens["graph", 64].runner_up
    assert triton.provider == "triton" and triton.note
    assert triton.config == get_provider("triton").default_config(TINY, 64)
    assert [c.spec for c in plan_checks(table, CPU, spec_patterns=["q2_*"])] == [TINY] * 3
    assert [c.timing for c in plan_checks(table, CPU, timings=["eager"])] == ["eager"]


def test_each_provider_and_config_is_gated_once(monkeypatch, sleepy):
    table = empty_table(device_metadata(CPU))
    table["entries"]["graph"] = {TINY.key: {str(t): right(sleepy) for t in (1, 2, 4)}}
    gated = []
    real = gate.check_correct

    def counted(fn, *args, **kwargs):
        gated.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(gate, "check_correct", counted)
    verifier = Verifier(CPU, {"repeats": 2, "min_round_s": 0.0})
    for check in plan_checks(table, CPU):
        assert verifier.run(check).problems == ()
    assert len(gated) == 2  # torch and the sleepy provider, once each for three buckets
    assert set(verifier.phases) == {"gate", "inputs", "warmup", "measure"}


# -- --fix ---------------------------------------------------------------------------------------


def test_fix_retunes_only_the_bad_bucket(tmp_path, sleepy, capsys):
    path = write_cpu_table(tmp_path, {
        "graph": {TINY: {1: right(sleepy), 64: beaten(sleepy)}, TINY_GPTJ: {4: right(sleepy)}},
    })  # fmt: skip
    before = read_table(path)["entries"]["graph"]
    status = run_verify(path, "--fix", "--providers", f"torch,{sleepy}", "--trials", "2")
    assert status == 0
    out = capsys.readouterr().out
    assert f"re-tuned into {path}:" in out
    assert f"graph {TINY.key} 64: {sleepy} {UNBEATABLE_US:.2f} us -> torch " in out
    after = read_table(path)["entries"]["graph"]
    assert after[TINY_GPTJ.key] == before[TINY_GPTJ.key]
    assert after[TINY.key]["1"] == before[TINY.key]["1"]
    fixed = after[TINY.key]["64"]
    assert fixed["provider"] == "torch" and fixed["median_us"] != UNBEATABLE_US
    assert set(fixed["providers_us"]) == {"torch", sleepy}
    # Its winner now wins (its recorded time is a real one: "slower" would be this machine's noise).
    verifier = Verifier(CPU)
    fixed_check = [c for c in plan_checks(read_table(path), CPU) if c.tokens == 64]
    assert set(verifier.run(*fixed_check).problems) <= {"slower"}


def test_fix_needs_the_table_named_after_the_device(tmp_path, sleepy, capsys):
    path = write_cpu_table(tmp_path, {"graph": {TINY: {64: beaten(sleepy)}}})
    renamed = path.rename(tmp_path / "mine.json")
    with pytest.raises(SystemExit) as exit_:
        run_verify(renamed, "--fix")
    assert exit_.value.code == 2
    assert f"--fix merges into {CPU_TABLE}: rename" in capsys.readouterr().err


# -- tables and arguments that cannot be used ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (orjson.dumps({"schema_version": 99}), "schema_version: expected 1"),
        (None, "No such file"),
        ("other device", "was tuned on 'Other GPU', this device is"),
    ],
    ids=["not-json", "off-schema", "missing", "other-device"],
)
def test_an_unusable_table_is_one_line_and_status_2(tmp_path, sleepy, capsys, content, message):
    path = tmp_path / CPU_TABLE
    if content == "other device":
        write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy)}}}, device_name="Other GPU")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        run_verify(path)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python -m autotune verify: error: ")
    assert captured.err.count("\n") == 1 and message in captured.err


def test_the_default_table_is_the_one_select_rope_reads(tmp_path, monkeypatch, sleepy, capsys):
    monkeypatch.setenv("ROPE_AUTOTUNE_CONFIG_DIR", str(tmp_path))
    path = write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy)}}})
    assert verify.default_table_path(CPU) == path
    assert main(["verify", "--device", "cpu"]) == 0
    assert f"verified {path} on cpu" in capsys.readouterr().out
    monkeypatch.setattr(verify, "table_search_path", lambda: [tmp_path / "nothing"])
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--device", "cpu"])
    assert exit_.value.code == 2
    assert f"no table: no {CPU_TABLE} in {tmp_path / 'nothing'}" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--timing", "eager"], ["--specs", "q4_*"]])
def test_filters_that_match_nothing_are_an_error(tmp_path, sleepy, capsys, flags):
    path = write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy)}}})
    with pytest.raises(SystemExit) as exit_:
        run_verify(path, *flags)
    assert exit_.value.code == 2
    assert f"no entry of {path} matches --timing and --specs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--trials", "2"], ["--providers", "torch"], ["--storage", "x"]])
def test_fix_options_need_fix(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--table", str(tmp_path / CPU_TABLE), *flag])
    assert exit_.value.code == 2
    assert "apply to --fix" in capsys.readouterr().err


@pytest.fixture
def root_logging():
    """The root logger's level and handlers, restored after the test."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], logging.INFO), (["--verbose"], logging.DEBUG), (["--quiet"], logging.WARNING)],
)
def test_verbose_and_quiet_set_the_log_level(tmp_path, sleepy, capsys, root_logging, flags, level):
    path = write_cpu_table(tmp_path, {"graph": {TINY: {1: right(sleepy)}}})
    assert run_verify(path, *flags) == 0
    assert root_logging.level == level
    assert "1 of 1 verified entries still right" in capsys.readouterr().out  # the report stays


def test_verbose_and_quiet_exclude_each_other(tmp_path, capsys, root_logging):
    with pytest.raises(SystemExit) as exit_:
        run_verify(tmp_path / CPU_TABLE, "--verbose", "--quiet")
    assert exit_.value.code == 2
    assert "--verbose and --quiet exclude each other" in capsys.readouterr().err


# -- on the GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_the_shipped_table_s_winners_pass_the_gate_on_this_gpu():
    """Llama-3-8B's buckets of the shipped table for this GPU (skipped on other GPUs): every
    winner and runner-up that runs here passes the gate and is timed under graph replay."""
    from kernels.table import device_table_name, shipped_config_dir

    device = torch.device("cuda", 0)
    path = shipped_config_dir() / device_table_name(torch.cuda.get_device_name(device))
    if not path.is_file():
        pytest.skip(f"no shipped table for {torch.cuda.get_device_name(device)}")
    checks = plan_checks(read_table(path), device, spec_patterns=["q32_kv8_d128_r128_neox_*"])
    assert checks
    verifier = Verifier(device)
    for check in checks:
        verifier.run(check)
        assert check.failures == [], check.failures
        assert check.winner_now is not None or "winner" in check.unavailable
