"""``autotune.cli_args``: the argument types, switches, logging, device flags and spec rules that
every command shares, and ``python -m autotune.perf_model_fit``'s command line built on them."""

import argparse
import logging
from pathlib import Path

import optuna
import pytest
import torch

from autotune.cli_args import (
    FlatList,
    OneLineParser,
    SpecGrid,
    add_logging_flags,
    add_switch,
    comma_list,
    device_from_arg,
    dtype_list,
    even_int,
    logging_from_args,
    positive_int,
    positive_int_list,
    provider_list,
    specs_from_args,
    timing_list,
    token_list,
)
from kernels import RopeSpec, provider_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root_logging():
    """The root logger's level and handlers, and Optuna's verbosity, restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    verbosity = optuna.logging.get_verbosity()
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers
    optuna.logging.set_verbosity(verbosity)


# -- argument types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (comma_list, " a, b,,c ", ["a", "b", "c"]),
        (comma_list, ",", []),
        (positive_int, "7", 7),
        (even_int, "64", 64),
        (positive_int_list, "16", [16]),
        (positive_int_list, "4,1,4", [4, 1, 4]),
        (token_list, "256,1,16,1", [1, 16, 256]),
        (dtype_list, "bf16, half,float16,fp32", [torch.bfloat16, torch.float16, torch.float32]),
        (timing_list, "eager,graph,eager", ["eager", "graph"]),
    ],
)
def test_types_parse(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_int, "0", "expected a positive integer, got '0'"),
        (positive_int, "-3", "expected a positive integer"),
        (positive_int, "2.5", "expected a positive integer"),
        (even_int, "33", "expected an even number, got 33"),
        (even_int, "0", "expected a positive integer"),
        (positive_int_list, "1,,4", "expected positive integers like 1,4"),
        (positive_int_list, "1,x", "expected positive integers like 1,4"),
        (token_list, "1,0", "tokens: expected positive integers"),
        (dtype_list, ",", "expected a comma list like bf16,fp16"),
        (dtype_list, "bf16,int8", "dtype: expected one of"),
        (timing_list, "graph,fast", "expected graph, eager or graph,eager"),
        (timing_list, "", "expected graph, eager or graph,eager"),
    ],
)
def test_bad_values_are_argument_type_errors(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_providers_are_registered_names_without_repeats():
    parse = provider_list()
    name = provider_names()[0]
    assert parse(f"{name}, {name}") == [name]
    with pytest.raises(argparse.ArgumentTypeError, match="names among"):
        parse(f"{name},nope")
    with pytest.raises(argparse.ArgumentTypeError, match="names among"):
        parse(",")


def test_provider_names_are_read_when_parsing():
    known = ["a"]
    parse = provider_list(lambda: known)
    with pytest.raises(argparse.ArgumentTypeError, match="names among a, got 'b'"):
        parse("b")
    known.append("b")  # e.g. a provider registered after the parser was built
    assert parse("b,a") == ["b", "a"]


def test_flat_list_joins_values_and_a_repeated_flag_replaces():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=positive_int_list, nargs="+", action=FlatList)
    assert parser.parse_args(["--n", "4", "1,4", "2"]).n == [4, 1, 2]
    assert parser.parse_args(["--n", "1", "--n", "3,2"]).n == [3, 2]
    assert parser.parse_args([]).n is None


def test_a_bad_value_is_one_line_naming_the_flag(capsys):
    parser = OneLineParser(prog="prog")
    parser.add_argument("--dtype", type=dtype_list)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--dtype", "fp8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("prog: error: argument --dtype: dtype: expected")
    assert len(err.strip().splitlines()) == 1


def test_switches_go_both_ways():
    parser = argparse.ArgumentParser()
    add_switch(parser, "--plots", default=True, help="e.g. --no-plots")
    add_switch(parser, "--style", default=None, help="e.g. --style")
    assert vars(parser.parse_args([])) == {"plots": True, "style": None}
    assert vars(parser.parse_args(["--no-plots", "--no-style"])) == {"plots": False, "style": False}
    assert vars(parser.parse_args(["--plots", "--style"])) == {"plots": True, "style": True}


# -- logging -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "level", "optuna_level"),
    [
        ([], logging.INFO, logging.ERROR),
        (["--verbose"], logging.DEBUG, logging.INFO),
        (["--quiet"], logging.WARNING, logging.ERROR),
        (["--verbose", "--no-quiet"], logging.DEBUG, logging.INFO),
    ],
)
def test_logging_flags_set_the_levels(root_logging, flags, level, optuna_level):
    parser = OneLineParser(prog="prog")
    add_logging_flags(parser, quiet="no progress bar")
    logging_from_args(parser, parser.parse_args(flags))
    assert root_logging.level == level
    assert optuna.logging.get_verbosity() == optuna_level
    assert "warnings only, no progress bar, e.g. --quiet" in parser.format_help()


def test_verbose_and_quiet_exclude_each_other(root_logging, capsys):
    parser = OneLineParser(prog="prog")
    add_logging_flags(parser, quiet="no summary")
    with pytest.raises(SystemExit) as exc:
        logging_from_args(parser, parser.parse_args(["--verbose", "--quiet"]))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: --verbose and --quiet exclude each other\n"


# -- devices -------------------------------------------------------------------------------------


def test_device_from_arg_names_the_flag(monkeypatch):
    assert device_from_arg("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--devices: expected e\.g\. cuda:0 or cpu, got 'tpu'"):
        device_from_arg("tpu", flag="--devices")
    with pytest.raises(ValueError, match=r"^--device: expected a cuda or cpu device, got meta$"):
        device_from_arg("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device: cuda:1 was asked for, but CUDA is not"):
        device_from_arg("cuda:1")


# -- specs ---------------------------------------------------------------------------------------


def spec_args(**given):
    """A namespace with every spec flag, None unless given."""
    flags = ("model", "model_config", "tensor_parallel_size", "head_size", "rotary_dim")
    flags += ("num_heads", "num_kv_heads", "is_neox_style", "dtype")
    return argparse.Namespace(**{flag: given.get(flag) for flag in flags})


GRID = SpecGrid(head_size=64, rotary_dim=32, num_heads=(8, 4))


def test_a_grid_fills_in_the_explicit_flags_not_given():
    assert specs_from_args(spec_args(), grid=GRID) == [
        RopeSpec(64, 32, 8, 8, True, torch.bfloat16),
        RopeSpec(64, 32, 4, 4, True, torch.bfloat16),
    ]
    assert specs_from_args(spec_args(head_size=16, num_kv_heads=[2]), grid=GRID) == [
        RopeSpec(16, 16, 8, 2, True, torch.bfloat16),  # rotary capped at the head size
        RopeSpec(16, 16, 4, 2, True, torch.bfloat16),
    ]


def test_a_grid_takes_models_or_explicit_flags_not_both():
    with pytest.raises(ValueError, match=r"^--head-size, --num-heads: not with --model"):
        specs_from_args(spec_args(model=["phi-2"], head_size=64, num_heads=[8]), grid=GRID)
    with pytest.raises(ValueError, match=r"^--tensor-parallel-size: applies to --model"):
        specs_from_args(spec_args(tensor_parallel_size=2), grid=GRID)
    (spec,) = specs_from_args(spec_args(model=["phi-2"], dtype=[torch.float16]), grid=GRID)
    assert spec == RopeSpec(80, 32, 32, 32, True, torch.float16)  # TP 1 only


def test_without_a_grid_models_and_an_explicit_spec_combine():
    args = spec_args(model=["phi-2"], head_size=64, num_heads=8, tensor_parallel_size=2)
    assert specs_from_args(args, torch.device("cpu")) == [
        RopeSpec(80, 32, 16, 16, True, torch.bfloat16),
        RopeSpec(80, 32, 16, 16, True, torch.float16),
        RopeSpec(64, 64, 4, 4, True, torch.bfloat16),
    ]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"rotary_dim": 32}, "^--rotary-dim: an explicit spec needs both --head-size and"),
        ({"head_size": 64, "num_kv_heads": 2}, "^--head-size, --num-kv-heads: an explicit spec"),
        ({"head_size": 64, "num_heads": 8, "rotary_dim": 66}, "at most --head-size=64, got 66"),
        ({"head_size": 64, "num_heads": 8, "num_kv_heads": 3}, "a divisor of --num-heads 8, got 3"),
        ({"model": ["phi-2"], "is_neox_style": False}, "^--is-neox-style: applies to an explicit"),
    ],
)
def test_flags_that_do_not_fit_name_themselves(given, message):
    with pytest.raises(ValueError, match=message):
        specs_from_args(spec_args(**given), torch.device("cpu"))


def test_the_default_space_needs_a_device():
    with pytest.raises(TypeError, match="needs a device"):
        specs_from_args(spec_args())


# -- python -m autotune.perf_model_fit -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rows", "{tmp}/rows.csv", "--output", "{tmp}/file"], "--output: "),
        (["--rows", "{tmp}/missing.csv", "--output", "{tmp}"], "missing.csv"),
        (["--storage", "{tmp}/typo.journal", "--output", "{tmp}"], "no such journal file"),
        (["--rows", "{tmp}/rows.csv", "--output", "{tmp}", "--timing", "fast"], "--timing"),
        (["--output", "{tmp}"], "one of the arguments --storage --rows is required"),
        (["--rows", "{tmp}/rows.csv", "--output", "{tmp}"], "no device metadata"),
        (["--rows", "{tmp}/rows.csv", "--output", "{tmp}", "--verbose", "--quiet"], "exclude"),
    ],
)
def test_perf_model_fit_bad_input_is_one_line(tmp_path, flags, message, capsys, root_logging):
    from autotune import perf_model_fit

    (tmp_path / "file").write_text("x")
    perf_model_fit.write_rows(tmp_path / "rows.csv", [])
    with pytest.raises(SystemExit) as exc:
        perf_model_fit.main([f.replace("{tmp}", str(tmp_path)) for f in flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m autotune.perf_model_fit: error: ") and message in err, err


def test_perf_model_fit_writes_the_model_quietly(tmp_path, capsys, root_logging):
    pytest.importorskip("sklearn")
    from autotune import perf_model_fit
    from kernels.perf_model import PerfModel

    spec = RopeSpec(64, 64, 8, 8, True, torch.bfloat16)
    rows = [perf_model_fit.Measurement(spec.key, t, "vllm", None, 1.0 + t / 64) for t in (1, 64)]
    perf_model_fit.write_rows(tmp_path / "rows.csv", rows)
    (tmp_path / "t.json").write_text('{"metadata": {"device_name": "Test GPU", "sm_count": 8}}')
    argv = ["--rows", str(tmp_path / "rows.csv"), "--metadata-from", str(tmp_path / "t.json")]
    assert perf_model_fit.main([*argv, "--output", str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    model = PerfModel.load(tmp_path / "out" / "Test_GPU.model.json")
    assert model is not None and model.predict_us("vllm", spec, 64, None) > 0


# -- the commands -------------------------------------------------------------------------------


def test_every_command_parses_through_cli_args():
    """The command modules take their types from cli_args, not from each other."""
    for module in ("cli", "verify_cli", "bench/_cli", "perf_model_fit"):
        source = (ROOT / "autotune" / f"{module}.py").read_text()
        assert "cli_args import" in source, module
        assert "from .cli import" not in source and "BooleanOptionalAction" not in source, module
