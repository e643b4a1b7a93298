"""python -m autotune.bench: the CPU run end to end (CSV columns, PNG plots, skipped providers),
the correctness gate, the tuned-config lookup, and flag parsing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from autotune import bench
from autotune.bench import _cli
from kernels import (
    RopeSpec,
    get_provider,
    register_provider,
    select_rope,
    unregister_provider,
)
from kernels.providers import default_triton_config
from kernels.providers._torch import TorchProvider
from kernels.table import device_metadata, device_table_name, empty_table, write_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL_GRID = [
    "--device", "cpu", "--batch-size", "1", "2", "--seq-len", "3", "--num-heads", "2",
    "--head-size", "64", "--rotary-dim", "32", "--repeats", "2", "--no-progress",
]  # fmt: skip
CPU_DEVICE_NAME = device_metadata("cpu")["device_name"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_valid_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# -- the command end to end -----------------------------------------------------------------------


def test_cpu_run_writes_documented_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    argv = [*SMALL_GRID, "--providers", "torch,triton,flashinfer,vllm", "--save-path", str(out)]
    assert _cli.main(argv) == 0
    printed = capsys.readouterr().out

    header, rows = read_csv(out / bench.CSV_NAME)
    assert header == list(bench.CSV_COLUMNS)
    # Both providers at both (batch, seq) pairs; flashinfer and vllm cannot run on the CPU.
    got = sorted((r["provider"], int(r["batch_size"]), int(r["seq_len"])) for r in rows)
    assert got == [("torch", 1, 3), ("torch", 2, 3), ("triton", 1, 3), ("triton", 2, 3)]
    spec = RopeSpec(64, 32, 2, 2, True, torch.bfloat16)
    for row in rows:
        num_tokens = int(row["batch_size"]) * int(row["seq_len"])
        assert int(row["num_tokens"]) == num_tokens
        assert row["device"] == CPU_DEVICE_NAME
        assert row["torch"] == torch.__version__ and row["cuda"] == ""
        assert (row["head_size"], row["rotary_dim"], row["num_heads"], row["num_kv_heads"]) == (
            "64",
            "32",
            "2",
            "2",
        )
        assert (row["is_neox"], row["dtype"]) == ("True", "bfloat16")
        p20, p50, p80 = (float(row[k]) for k in ("p20_us", "p50_us", "p80_us"))
        assert 0 < p20 <= p50 <= p80
        tbps = spec.bytes_moved(num_tokens) / (p50 * 1e-6) / 1e12
        assert float(row["tbps"]) == pytest.approx(tbps, rel=1e-4)
        assert float(row["pct_floor"]) > 0
        if row["provider"] == "triton":
            assert json.loads(row["config"]) == default_triton_config(spec, num_tokens)

    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["rope_q2_kv2_d64_r32_neox_bfloat16.png"]
    assert_valid_png(pngs[0])

    assert "flashinfer: unavailable on cpu: runs on CUDA devices only" in printed
    assert "vllm: unavailable on cpu: runs on CUDA devices only" in printed
    for token_count in ("3", "6"):
        assert any(line.split()[:1] == [token_count] for line in printed.splitlines())
    assert "% floor" in printed


def test_plots_one_figure_per_spec_and_dtype(tmp_path):
    specs = [RopeSpec(64, 64, h, 1, False, dtype) for h in (2, 4) for dtype in ("fp16", "fp32")]
    result = bench.run_bench(specs, [1], [2, 5], "cpu", providers=["torch"], repeats=2)
    assert {(r["num_heads"], r["dtype"]) for r in result.rows} == {
        (h, d) for h in (2, 4) for d in ("float16", "float32")
    }
    paths = bench.plot_results(result.rows, tmp_path, copy_bandwidth=result.copy_bandwidth)
    assert len(paths) == 4 and len({p.name for p in paths}) == 4
    for path in paths:
        assert "gptj" in path.name
        assert_valid_png(path)


def test_pct_floor_is_floor_time_over_median():
    spec = RopeSpec(64, 32, 2, 1, True, torch.float32)
    result = bench.run_bench([spec], [3], [1], "cpu", providers=["torch"], repeats=2)
    (row,) = result.rows
    floor_us = spec.bytes_moved(3) / result.copy_bandwidth * 1e6
    assert row["pct_floor"] == pytest.approx(100 * floor_us / row["p50_us"], rel=1e-6)
    assert result.copy_bandwidth > 1e8  # bytes/s: any real machine copies faster


# -- the correctness gate -------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyLeftAlone(TorchProvider):
    """The torch provider made wrong: it rotates the query and forgets the key."""

    def build(self, spec, config):
        right = super().build(spec, config)
        return lambda positions, query, key, cache: right(positions, query, None, cache)


@pytest.fixture
def key_left_alone():
    original = get_provider("torch")
    unregister_provider("torch")
    register_provider(_KeyLeftAlone())
    yield
    unregister_provider("torch")
    register_provider(original)


def test_wrong_provider_reported_and_not_timed(key_left_alone, tmp_path, capsys):
    spec = RopeSpec(64, 32, 2, 2, True, torch.float32)
    result = bench.run_bench([spec], [1], [5], "cpu", providers=["torch"], repeats=2)
    assert result.rows == []
    (skip,) = result.skipped
    assert (skip.provider, skip.spec_key, skip.num_tokens) == ("torch", spec.key, 5)
    assert "wrong result" in skip.reason and "key" in skip.reason

    argv = [*SMALL_GRID, "--providers", "torch", "--dtype", "fp32", "--save-path", str(tmp_path)]
    assert _cli.main(argv) == 1  # nothing timed
    assert "torch (q2_kv2_d64_r32_neox_float32, 3 tokens): wrong result" in capsys.readouterr().out


# -- triton_tuned and select_rope follow the table ------------------------------------------------


def test_triton_tuned_uses_the_tables_config(tmp_path):
    spec = RopeSpec(64, 32, 2, 2, True, torch.float32)
    tuned = {"block_t": 1, "block_h": 1, "head_split": 2, "num_warps": 1, "num_stages": 1}
    assert tuned != default_triton_config(spec, 3)
    table = empty_table(device_metadata("cpu"))
    table["entries"]["graph"][spec.key] = {
        "4": {"provider": "triton", "config": tuned, "median_us": 5.0},
        "64": {"provider": "vllm", "config": {}, "median_us": 3.0, "providers_us": {"vllm": 3.0}},
    }
    write_table(tmp_path / device_table_name(CPU_DEVICE_NAME), table)

    result = bench.run_bench(
        [spec], [1], [3, 40], "cpu", providers=["triton_tuned", "select_rope"], repeats=2,
        table_dir=tmp_path,
    )  # fmt: skip
    rows = {(r["provider"], r["num_tokens"]): r for r in result.rows}
    assert set(rows) == {("triton_tuned", 3), ("select_rope", 3), ("select_rope", 40)}
    assert json.loads(rows["triton_tuned", 3]["config"]) == tuned
    # select_rope runs what the table says: Triton with the tuned config at bucket 4; at bucket
    # 64 the winner (vllm) cannot run on the CPU and the selector falls back to torch.
    provider, config = rows["select_rope", 3]["config"].split(" ", 1)
    assert (provider, json.loads(config)) == ("triton", tuned)
    assert rows["select_rope", 40]["config"].split()[0] == "torch"
    expected = select_rope(64, 32, 2, 2, True, "fp32", "cpu", table_dir=tmp_path).explain(40)
    assert expected.provider == "torch"
    (skip,) = result.skipped
    assert (skip.provider, skip.num_tokens) == ("triton_tuned", 40)
    assert "winner at bucket 64 is vllm" in skip.reason


def test_triton_tuned_without_table_is_skipped_per_spec(tmp_path):
    spec = RopeSpec(64, 32, 2, 2, True, torch.float32)
    result = bench.run_bench(
        [spec], [1], [3, 5], "cpu", providers=["triton_tuned"], repeats=2, table_dir=tmp_path
    )
    assert result.rows == []
    (skip,) = result.skipped  # once for the spec, not once per token count
    assert (skip.spec_key, skip.num_tokens) == (spec.key, None)
    assert "no graph table entry" in skip.reason


# -- flag parsing ---------------------------------------------------------------------------------


def parse_specs(*flags: str) -> list[RopeSpec]:
    return _cli.specs_from_args(_cli.build_parser().parse_args(list(flags)))


def test_default_grid_is_vllms_benchmark_grid():
    args = _cli.build_parser().parse_args([])
    specs = _cli.specs_from_args(args)
    assert [(s.num_heads, s.num_kv_heads) for s in specs] == [(32, 32), (48, 48)]
    assert {(s.head_size, s.rotary_dim, s.is_neox, s.dtype) for s in specs} == {
        (128, 32, True, torch.bfloat16)
    }
    assert args.batch_size == [1, 4, 16, 64] and args.seq_len == [64, 128, 256, 512]


@pytest.mark.parametrize(
    ("flags", "is_neox"),
    [((), True), (("--is-neox-style",), True), (("--no-is-neox-style",), False)],
)
def test_is_neox_style_both_ways(flags, is_neox):
    assert {s.is_neox for s in parse_specs(*flags)} == {is_neox}


@pytest.mark.parametrize(
    ("flag", "dest"),
    [("rotate-buffers", "rotate_buffers"), ("plots", "plots"), ("progress", "progress")],
)
def test_other_booleans_both_ways(flag, dest):
    parser = _cli.build_parser()
    assert getattr(parser.parse_args([]), dest) is True
    assert getattr(parser.parse_args([f"--{flag}"]), dest) is True
    assert getattr(parser.parse_args([f"--no-{flag}"]), dest) is False


@pytest.mark.parametrize(
    ("alias", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("float32", torch.float32),
    ],
)
def test_dtype_aliases(alias, dtype):
    assert {s.dtype for s in parse_specs("--dtype", alias)} == {dtype}


def test_dtype_is_a_comma_list_as_in_the_tuner():
    specs = parse_specs("--num-heads", "8", "--dtype", "fp16,bf16,half")
    assert [s.dtype for s in specs] == [torch.float16, torch.bfloat16]


def test_head_and_batch_lists_are_flat_and_a_repeated_flag_replaces():
    args = _cli.build_parser().parse_args(["--num-heads", "8", "16,8", "--seq-len", "7", "3,7"])
    assert args.num_heads == [8, 16] and args.seq_len == [7, 3]
    args = _cli.build_parser().parse_args(["--batch-size", "2", "--batch-size", "5,6"])
    assert args.batch_size == [5, 6]


def test_a_model_config_takes_the_style_flag_but_a_preset_does_not(tmp_path):
    config = {"model_type": "llama", "num_attention_heads": 8, "hidden_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (spec,) = parse_specs("--model-config", str(tmp_path), "--no-is-neox-style")
    assert not spec.is_neox
    with pytest.raises(ValueError, match="--is-neox-style: applies to an explicit spec"):
        parse_specs("--model", "llama-3-8b", "--no-is-neox-style")


@pytest.mark.parametrize("rotary_dim", [2, 24, 62, 64])
def test_rotary_dim_any_even_value_up_to_head_size(rotary_dim):
    specs = parse_specs("--head-size", "64", "--rotary-dim", str(rotary_dim))
    assert {s.rotary_dim for s in specs} == {rotary_dim}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--rotary-dim", "33"), "--rotary-dim: expected an even number, got 33"),
        (("--rotary-dim", "0"), "--rotary-dim: expected a positive integer"),
        (
            ("--head-size", "64", "--rotary-dim", "66"),
            "--rotary-dim: expected an even number at most --head-size=64, got 66",
        ),
        (("--dtype", "fp8"), "--dtype: dtype: expected one of"),
        (("--batch-size", "1,x"), "--batch-size: expected positive integers"),
        (("--providers", "torch,nope"), "--providers: expected a comma list of names among"),
        (("--dtype", "bf16", "fp16"), "unrecognized arguments: fp16"),
        (("--dtype", ","), "--dtype: expected a comma list like bf16,fp16"),
        (("--num-heads", "32", "--num-kv-heads", "5"), "--num-kv-heads: expected a divisor"),
        (("--num-heads", "8", "16", "--num-kv-heads", "1", "2", "4"), "one per --num-heads"),
        (("--tensor-parallel-size", "2"), "--tensor-parallel-size: applies to --model"),
        (("--model", "llama-3-8b", "--num-heads", "8"), "--num-heads: not with --model"),
        (("--timing", "slow"), "--timing: invalid choice"),
        (("--device", "tpu"), "--device: expected e.g. cuda:0 or cpu"),
        (("--seed", "-1"), "--seed: expected an integer from 0 to 4294967295"),
        (("--save-path", "{file}"), "--save-path: {file} is a file, not a directory"),
        (("--save-path", "{file}/out"), "--save-path: {file}/out is under a file"),
        (("--save-path", ""), "--save-path: expected a directory, got an empty string"),
        (("--model-config", "{config}"), "model_config: head_dim: expected a positive integer"),
        (("--model-config", "{mrope}"), "mrope_section: expected three non-negative integers"),
        (("--model", "qwen2-vl-2b"), "--model: q12_kv2_d128_r128_neox_bfloat16_mrope16-24-24 is"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "head_dim": [64]}))
    mrope = {"num_attention_heads": 8, "head_dim": 64, "rope_scaling": {"mrope_section": [8]}}
    (tmp_path / "mrope.json").write_text(json.dumps(mrope))
    paths = {"{file}": "file", "{config}": "config.json", "{mrope}": "mrope.json"}
    for name, path in paths.items():
        flags = tuple(f.replace(name, str(tmp_path / path)) for f in flags)
        message = message.replace(name, str(tmp_path / path))
    monkeypatch.setattr(_cli, "run_bench", None)  # never reached
    with pytest.raises(SystemExit) as exc:
        _cli.main([*flags, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["--device", "cuda:0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device: cuda:0 was asked for, but CUDA is not available here" in err


def test_every_flag_reaches_run_bench_or_the_outputs(tmp_path, monkeypatch):
    """Each parsed flag changes what main does: a new flag without a check here fails."""
    seen = {}

    def fake_run_bench(specs, batch_sizes, seq_lens, device, **kwargs):
        seen.update(specs=specs, batch_sizes=batch_sizes, seq_lens=seq_lens, device=device)
        seen.update(kwargs)
        row = {k: 1 for k in bench.CSV_COLUMNS}
        row.update(provider="torch", is_neox=False, dtype="float16", p20_us=1.0, p80_us=3.0)
        row.update(p50_us=2.0, pct_floor=50.0, config="")
        return bench.BenchResult(rows=[row], copy_bandwidth=1e9, device="X")

    monkeypatch.setattr(_cli, "run_bench", fake_run_bench)
    argv = [
        "--head-size", "80", "--rotary-dim", "32", "--num-heads", "8,16", "--num-kv-heads", "4",
        "--no-is-neox-style", "--dtype", "fp16", "--batch-size", "2", "3", "--seq-len", "7",
        "--providers", "torch,select_rope", "--device", "cpu", "--timing", "eager",
        "--repeats", "3", "--no-rotate-buffers", "--seed", "11", "--table-dir", str(tmp_path),
        "--save-path", str(tmp_path / "out"), "--plots", "--no-progress",
    ]  # fmt: skip
    checks = {
        "head_size": lambda: {s.head_size for s in seen["specs"]} == {80},
        "rotary_dim": lambda: {s.rotary_dim for s in seen["specs"]} == {32},
        "num_heads": lambda: [s.num_heads for s in seen["specs"]] == [8, 16],
        "num_kv_heads": lambda: {s.num_kv_heads for s in seen["specs"]} == {4},
        "is_neox_style": lambda: {s.is_neox for s in seen["specs"]} == {False},
        "dtype": lambda: {s.dtype for s in seen["specs"]} == {torch.float16},
        "batch_size": lambda: seen["batch_sizes"] == [2, 3],
        "seq_len": lambda: seen["seq_lens"] == [7],
        "providers": lambda: seen["providers"] == ["torch", "select_rope"],
        "device": lambda: seen["device"] == torch.device("cpu"),
        "timing": lambda: seen["timing"] == "eager",
        "repeats": lambda: seen["repeats"] == 3,
        "rotate_buffers": lambda: seen["rotate"] is False,
        "seed": lambda: seen["seed"] == 11,
        "table_dir": lambda: seen["table_dir"] == tmp_path,
        "save_path": lambda: (tmp_path / "out" / bench.CSV_NAME).is_file(),
        "plots": lambda: len(list((tmp_path / "out").glob("*.png"))) == 1,
        "progress": lambda: seen["progress"] is False,
        # Checked in the model tests below (they exclude the explicit spec flags).
        "model": lambda: True,
        "model_config": lambda: True,
        "tensor_parallel_size": lambda: True,
    }
    parser = _cli.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == set(checks), "a flag was added or removed: check that it is used"
    assert _cli.main(argv) == 0
    failed = [dest for dest, check in checks.items() if not check()]
    assert failed == []


def test_model_presets_and_hf_config(tmp_path):
    specs = parse_specs("--model", "llama-3-8b", "--tensor-parallel-size", "2", "--dtype", "fp16")
    assert [(s.num_heads, s.num_kv_heads, s.head_size, s.rotary_dim) for s in specs] == [
        (16, 4, 128, 128)
    ]
    assert specs[0].dtype == torch.float16 and specs[0].is_neox
    config = {
        "model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64,
        "torch_dtype": "float16",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    (spec,) = parse_specs("--model-config", str(tmp_path), "--tensor-parallel-size", "4")
    assert (spec.num_heads, spec.head_size, spec.rotary_dim, spec.is_neox) == (4, 256, 64, False)
    (spec,) = parse_specs("--model-config", str(tmp_path), "--is-neox-style")
    assert spec.is_neox


@pytest.mark.slow
def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "autotune.bench", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--is-neox-style, --no-is-neox-style" in done.stdout
    assert "example: python -m autotune.bench" in done.stdout


# -- on the GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_small_grid_every_provider_timed_or_explained():
    spec = RopeSpec(128, 32, 8, 8, True, torch.bfloat16)
    result = bench.run_bench([spec], [1, 4], [64], "cuda:0", repeats=5)
    timed = {r["provider"] for r in result.rows}
    explained = {s.provider for s in result.skipped}
    assert {"torch", "triton", "select_rope"} <= timed
    assert set(bench.all_provider_names()) == timed | explained
    for row in result.rows:
        assert 0 < row["p20_us"] <= row["p50_us"] <= row["p80_us"]
        assert 0 < row["pct_floor"] < 150  # above 100: a floor or a timing bug
