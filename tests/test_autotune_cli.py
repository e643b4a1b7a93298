"""``python -m autotune``'s flags: parsing, how they become specs, errors and exit codes."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import optuna
import pytest
import torch

from autotune import cli
from autotune._environment import TUNE_EXTRA_MODULES, environment_problem
from autotune.cli import build_export_parser, build_parser, main, specs_from_args
from autotune.models import CPU_DEFAULT_MODELS, MAX_TOKENS, get_preset
from autotune.objective import SEARCH_REPEATS
from kernels import RopeSpec

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)  # specs_from_args only reads the device type


def parse(*argv):
    return build_parser().parse_args(list(argv))


def run_cli(*argv, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "autotune", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_defaults():
    args = parse()
    assert args.device is None and args.model is None and args.model_config is None
    assert args.is_neox_style is None and args.dtype is None and args.tokens is None
    assert args.timing == ["graph"] and args.verbose is False and args.quiet is False
    assert args.output is None and args.storage is None and args.save_path is None
    assert args.repeats == SEARCH_REPEATS and args.seed is None


def test_every_flag_parses():
    args = parse(
        "--device", "cpu", "--model", "llama-3-8b", "--model", "phi-2", "--model-config",
        "cfg.json", "--tensor-parallel-size", "2", "--head-size", "128", "--rotary-dim", "64",
        "--num-heads", "8", "--num-kv-heads", "2", "--no-is-neox-style", "--dtype", "bf16,float16",
        "--tokens", "256,1,16", "--providers", "triton,torch", "--trials", "7", "--timing",
        "graph,eager", "--output", "out", "--storage", "s.journal", "--save-path", "csv",
        "--seed", "3", "--verbose", "--no-quiet", "--repeats", "25",
    )  # fmt: skip
    assert args.device == "cpu" and args.model == ["llama-3-8b", "phi-2"]
    assert args.model_config == ["cfg.json"] and args.tensor_parallel_size == 2
    assert (args.head_size, args.rotary_dim, args.num_heads, args.num_kv_heads) == (128, 64, 8, 2)
    assert args.is_neox_style is False and args.dtype == [torch.bfloat16, torch.float16]
    assert args.tokens == [1, 16, 256] and args.providers == ["triton", "torch"]
    assert args.trials == 7 and args.timing == ["graph", "eager"] and args.seed == 3
    assert (args.output, args.storage, args.save_path) == ("out", "s.journal", "csv")
    assert args.verbose is True and args.quiet is False and args.repeats == 25


@pytest.mark.parametrize(
    ("flag", "attr", "expected"),
    [
        ("--is-neox-style", "is_neox_style", True),
        ("--no-is-neox-style", "is_neox_style", False),
        ("--verbose", "verbose", True),
        ("--no-verbose", "verbose", False),
        ("--quiet", "quiet", True),
        ("--no-quiet", "quiet", False),
    ],
)
def test_boolean_flags(flag, attr, expected):
    assert getattr(parse(flag), attr) is expected


def test_export_flags():
    args = build_export_parser().parse_args(
        ["--storage", "x", "--output", "d", "--include-partial"]
    )
    assert (args.storage, args.output, args.include_partial) == ("x", "d", True)
    assert build_export_parser().parse_args([]).include_partial is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--trials", "0"],
        ["--trials", "x"],
        ["--tokens", "1,0"],
        ["--dtype", "int8"],
        ["--providers", "triton,nope"],
        ["--timing", "fast"],
        ["--tensor-parallel-size", "-2"],
        ["--repeats", "0"],
        ["--seed", "-1"],
        ["--seed", str(2**32)],
        ["--seed", "99999999999999999999999"],
        ["--tokens", "99999999999999999999"],
        ["--tokens", f"1,{MAX_TOKENS + 1}"],
        ["--dtype", ""],
        ["--dtype", ","],
        ["--rotary-dim", "33"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and len(err.strip().splitlines()) == 1, err


def test_seed_range_ends_are_accepted():
    assert parse("--seed", "0").seed == 0 and parse("--seed", str(2**32 - 1)).seed == 2**32 - 1


def test_help_gives_an_example_for_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "e.g." in (action.help or ""), action.option_strings
    text = parser.format_help()
    assert "--no-is-neox-style" in text and "export" in text
    # Help states the contract: no measurements or history that go stale.
    for stale in ("H200", "session", "%", "trials measured"):
        assert stale not in text and stale not in build_export_parser().format_help(), stale


def test_specs_from_explicit_flags():
    args = parse(
        "--head-size", "128", "--rotary-dim", "64", "--num-heads", "32", "--num-kv-heads", "8",
        "--no-is-neox-style", "--dtype", "fp16,fp32", "--tensor-parallel-size", "4",
    )  # fmt: skip
    assert specs_from_args(args, GPU) == [
        RopeSpec(128, 64, 8, 2, False, torch.float16),
        RopeSpec(128, 64, 8, 2, False, torch.float32),
    ]
    args = parse("--head-size", "80", "--num-heads", "4")  # rotary = head, kv = heads, neox
    assert specs_from_args(args, GPU) == [RopeSpec(80, 80, 4, 4, True, torch.bfloat16)]


def test_specs_from_models_and_config():
    args = parse("--model", "llama-3-70b", "--model", "gpt-j-6b", "--dtype", "bf16")
    specs = specs_from_args(args, GPU)
    assert specs == get_preset("llama-3-70b").specs([torch.bfloat16]) + get_preset(
        "gpt-j-6b"
    ).specs([torch.bfloat16])
    assert len(specs) == 5  # 70B at TP 1, 2, 4, 8 and GPT-J
    args = parse("--model", "llama-3-8b", "--tensor-parallel-size", "8")
    assert {(s.num_heads, s.num_kv_heads) for s in specs_from_args(args, GPU)} == {(4, 1)}
    args = parse("--model-config", str(FIXTURES / "hf_phi2.json"), "--tensor-parallel-size", "2")
    assert specs_from_args(args, GPU) == [RopeSpec(80, 32, 16, 16, True, torch.float16)]


def test_default_space_depends_on_the_device():
    cpu = specs_from_args(parse(), CPU)
    assert len(cpu) == len(CPU_DEFAULT_MODELS)
    gpu = specs_from_args(parse(), GPU)
    assert len(gpu) > len(cpu)
    fp16_tp2 = specs_from_args(parse("--dtype", "fp16", "--tensor-parallel-size", "2"), GPU)
    assert fp16_tp2 and {s.dtype for s in fp16_tp2} == {torch.float16}
    assert RopeSpec(128, 128, 32, 4, True, torch.float16) in fp16_tp2  # Llama-3 70B at TP 2


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--rotary-dim", "64"], "explicit spec"),
        (["--num-kv-heads", "2"], "explicit spec"),
        (["--head-size", "64"], "--num-heads"),
        (["--model", "llama-3-8b", "--is-neox-style"], "--is-neox-style"),
        (["--model", "nope"], "model"),
        (["--model", "qwen2.5-7b", "--tensor-parallel-size", "8"], "tensor_parallel_size"),
    ],
)
def test_specs_from_args_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        specs_from_args(parse(*argv), GPU)


def test_main_reports_flag_conflicts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--head-size", "64"])
    assert exc.value.code == 2 and "--num-heads" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "--device: expected e.g. cuda:0 or cpu, got 'tpu'"),
        (["--devices", "meta,cpu"], "--devices: expected a cuda or cpu device, got meta"),
        (["--device", "cpu", "--verbose", "--quiet"], "--verbose and --quiet exclude each other"),
    ],
)
def test_device_and_logging_errors_name_the_flag(flags, message, no_tuning, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--tokens", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert no_tuning == []


def test_list_models(capsys):
    assert main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-70b" in out and "deepseek-v2" in out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2():
    result = run_cli("--device", "cuda:0", "--tokens", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# -- bad input fails before tuning: one line, exit status 2 ---------------------------------------


@pytest.fixture
def no_tuning(monkeypatch):
    """cli.tune replaced: records its arguments, returns a one-entry table."""
    calls = []

    def fake_tune(specs, tokens, **kwargs):
        calls.append(kwargs)
        return {"entries": {"graph": {"q2_kv1_d16_r16_neox_float32": {"1": {}}}}}

    monkeypatch.setattr(cli, "tune", fake_tune)
    monkeypatch.setattr(cli, "format_summary", lambda table: "summary")
    return calls


def write_config(tmp_path, **fields):
    config = {"num_attention_heads": 32, "hidden_size": 4096, "num_key_value_heads": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, **fields}))
    return str(path)


def bad_inputs(tmp_path, read_only_dir):
    file = tmp_path / "file"
    file.write_text("x")
    return {
        "output-file": (["--output", str(file)], "--output: ", "is a file"),
        "output-under-file": (["--output", str(file / "out")], "--output: ", "under a file"),
        "output-read-only": (["--output", str(read_only_dir)], "--output: ", "not writable"),
        "output-empty": (["--output", ""], "--output: ", "empty"),
        "save-path-file": (["--save-path", str(file)], "--save-path: ", "is a file"),
        "storage-dir": (["--storage", str(tmp_path)], str(tmp_path), "is a directory"),
        "storage-empty": (["--storage", ""], "storage ''", "empty"),
        "storage-garbage": (["--storage", "garbage://x"], "garbage://x", "unknown scheme"),
        "storage-http": (["--storage", "http://host/s"], "http://host/s", "unknown scheme"),
        "storage-sqlite-dir": (["--storage", f"sqlite:///{tmp_path}"], "sqlite", "directory"),
        "storage-read-only": (
            ["--storage", str(read_only_dir / "s.journal")],
            str(read_only_dir),
            "not writable",
        ),
        "config-head-dim-list": (
            ["--model-config", write_config(tmp_path / "a", head_dim=[128])],
            "head_dim",
            "positive integer",
        ),
        "config-head-dim-half": (
            ["--model-config", write_config(tmp_path / "b", head_dim=127.5)],
            "head_dim",
            "127.5",
        ),
        "config-kv-dict": (
            ["--model-config", write_config(tmp_path / "c", num_key_value_heads={"a": 1})],
            "num_key_value_heads",
            "positive integer",
        ),
        "config-kv-zero": (
            ["--model-config", write_config(tmp_path / "d", num_key_value_heads=0)],
            "num_key_value_heads",
            "got 0",
        ),
        "config-rotary-list": (
            ["--model-config", write_config(tmp_path / "e", rotary_dim=[64])],
            "rotary_dim",
            "positive integer",
        ),
        "config-mrope": (
            ["--model-config", write_config(tmp_path / "f", rope_scaling={"mrope_section": [8]})],
            "mrope_section",
            "three non-negative integers",
        ),
    }


BAD_INPUTS = [
    "output-file", "output-under-file", "output-read-only", "output-empty", "save-path-file",
    "storage-dir", "storage-empty", "storage-garbage", "storage-http", "storage-sqlite-dir",
    "storage-read-only", "config-head-dim-list", "config-head-dim-half", "config-kv-dict",
    "config-kv-zero", "config-rotary-list", "config-mrope",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_before_tuning(case, tmp_path, read_only_dir, no_tuning, capsys):
    for sub in "abcdef":
        (tmp_path / sub).mkdir()
    flags, names, reason = bad_inputs(tmp_path, read_only_dir)[case]
    argv = ["--device", "cpu", "--tokens", "1", "--output", str(tmp_path / "out"), *flags]
    if "--storage" not in flags:
        argv += ["--storage", str(tmp_path / "s.journal")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert names in err and reason in err, err
    assert no_tuning == []


def test_good_run_passes_the_opened_storage(tmp_path, no_tuning, capsys):
    journal = tmp_path / "s.journal"
    argv = ["--device", "cpu", "--tokens", "1", "--output", str(tmp_path / "new" / "out")]
    assert main([*argv, "--storage", str(journal), "--seed", "7"]) == 0
    (kwargs,) = no_tuning
    assert isinstance(kwargs["storage"], optuna.storages.JournalStorage) and journal.exists()
    assert kwargs["seed"] == 7 and kwargs["output"] == str(tmp_path / "new" / "out")
    assert "summary" in capsys.readouterr().out


def test_gemma3_text_config_is_read():
    args = parse("--model-config", str(FIXTURES / "hf_gemma3_4b.json"))
    assert specs_from_args(args, GPU) == [RopeSpec(256, 256, 8, 4, True, torch.bfloat16)]


def test_nothing_measured_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "tune", lambda *a, **k: {"entries": {"graph": {}, "eager": {}}})
    argv = ["--device", "cpu", "--tokens", "1", "--output", str(tmp_path)]
    assert main([*argv, "--storage", str(tmp_path / "s.journal"), "--quiet"]) == 1
    assert "no study finished" in capsys.readouterr().err


# -- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--storage", "garbage://x"], "unknown scheme 'garbage'"),
        (["--storage", "{tmp}/typo.journal"], "typo.journal': no such journal file"),
        (["--storage", "sqlite:///{tmp}/typo.db"], "no such database file"),
        (["--storage", "{tmp}/s.journal", "--output", "{tmp}/s.journal"], "--output: "),
    ],
)
def test_export_bad_input_is_one_line_and_creates_nothing(tmp_path, flags, message, capsys):
    journal = tmp_path / "s.journal"
    optuna.create_study(storage=cli.open_storage(journal), study_name="x")
    before = sorted(tmp_path.iterdir())
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as exc:
        main(["export", *flags] + ([] if "--output" in flags else ["--output", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_export_of_an_empty_storage_exits_1(tmp_path, capsys):
    optuna.create_study(storage=cli.open_storage(tmp_path / "s.journal"), study_name="x")
    argv = ["export", "--storage", str(tmp_path / "s.journal"), "--output", str(tmp_path)]
    assert main(argv) == 1
    assert "nothing written" in capsys.readouterr().err


# -- the environment: the tune extra, and our kernels package -------------------------------------


@pytest.mark.parametrize("missing", TUNE_EXTRA_MODULES)
def test_missing_tune_extra_names_the_install(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # its import fails
    problem = environment_problem()
    assert missing in problem and "pip install 'rope-autotune[tune]'" in problem


def test_foreign_kernels_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))
    assert "is not rope-autotune's" in environment_problem()
    monkeypatch.undo()
    assert environment_problem() is None


BLOCK_OPTUNA = """
import runpy, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "optuna":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocker())
sys.argv = ["autotune", "--help"]
runpy.run_module("autotune", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", ["autotune", "autotune.bench"])
def test_main_without_optuna_says_which_extra(module):
    code = BLOCK_OPTUNA.replace('"autotune", run_name', f'"{module}", run_name')
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "rope-autotune[tune]" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_main_with_another_kernels_package_says_so(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('"""Not ours."""\n')
    for module in ("autotune", "autotune.bench"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=tmp_path,  # first on sys.path: its kernels shadows ours
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "not rope-autotune's" in done.stderr and str(tmp_path) in done.stderr
        assert "Traceback" not in done.stderr
