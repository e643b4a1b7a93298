"""``python -m autotune``'s flags: parsing, how they become specs, errors and exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autotune.cli import build_export_parser, build_parser, main, specs_from_args
from autotune.models import CPU_DEFAULT_MODELS, get_preset
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
    assert args.compile_workers is None and args.repeats == SEARCH_REPEATS
    assert args.compile_overlap is False


def test_every_flag_parses():
    args = parse(
        "--device", "cpu", "--model", "llama-3-8b", "--model", "phi-2", "--model-config",
        "cfg.json", "--tensor-parallel-size", "2", "--head-size", "128", "--rotary-dim", "64",
        "--num-heads", "8", "--num-kv-heads", "2", "--no-is-neox-style", "--dtype", "bf16,float16",
        "--tokens", "256,1,16", "--providers", "triton,torch", "--trials", "7", "--timing",
        "graph,eager", "--output", "out", "--storage", "s.journal", "--save-path", "csv",
        "--seed", "3", "--verbose", "--no-quiet", "--compile-workers", "6", "--repeats", "25",
        "--compile-overlap",
    )  # fmt: skip
    assert args.device == "cpu" and args.model == ["llama-3-8b", "phi-2"]
    assert args.model_config == ["cfg.json"] and args.tensor_parallel_size == 2
    assert (args.head_size, args.rotary_dim, args.num_heads, args.num_kv_heads) == (128, 64, 8, 2)
    assert args.is_neox_style is False and args.dtype == [torch.bfloat16, torch.float16]
    assert args.tokens == [1, 16, 256] and args.providers == ["triton", "torch"]
    assert args.trials == 7 and args.timing == ["graph", "eager"] and args.seed == 3
    assert (args.output, args.storage, args.save_path) == ("out", "s.journal", "csv")
    assert args.verbose is True and args.quiet is False and args.compile_workers == 6
    assert args.repeats == 25 and args.compile_overlap is True


@pytest.mark.parametrize(
    ("flag", "attr", "expected"),
    [
        ("--is-neox-style", "is_neox_style", True),
        ("--no-is-neox-style", "is_neox_style", False),
        ("--verbose", "verbose", True),
        ("--no-verbose", "verbose", False),
        ("--quiet", "quiet", True),
        ("--no-quiet", "quiet", False),
        ("--compile-overlap", "compile_overlap", True),
        ("--no-compile-overlap", "compile_overlap", False),
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
        ["--compile-workers", "-1"],
        ["--compile-workers", "two"],
        ["--repeats", "0"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_help_gives_an_example_for_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "e.g." in (action.help or ""), action.option_strings
    text = parser.format_help()
    assert "--no-is-neox-style" in text and "export" in text


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


def test_list_models(capsys):
    assert main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-70b" in out and "deepseek-v2" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2():
    result = run_cli("--device", "cuda:0", "--tokens", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
