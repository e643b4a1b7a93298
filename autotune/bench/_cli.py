"""``python -m autotune.bench``: the command line over :func:`autotune.bench.run_bench`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kernels import RopeSpec
from kernels.table import TIMING_MODES

from .._preflight import check_output_dir
from ..cli_args import (
    OneLineParser,
    SpecGrid,
    add_int_list,
    add_switch,
    device_from_arg,
    dtype_list,
    even_int,
    positive_int,
    provider_list,
    seed,
    setup_logging,
)
from ..cli_args import specs_from_args as _specs_from_args
from ._plots import plot_results
from ._report import CSV_NAME, format_skipped, format_table, write_csv
from ._run import all_provider_names, run_bench

__all__ = ["DEFAULT_GRID", "build_parser", "main", "specs_from_args"]

# The default grid: that of vLLM's benchmarks/kernels/benchmark_rope.py.
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
DEFAULT_SEQ_LENS = (64, 128, 256, 512)
DEFAULT_GRID = SpecGrid(head_size=128, rotary_dim=32, num_heads=(32, 48))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag with an example in its help)."""
    parser = OneLineParser(
        prog="python -m autotune.bench",
        description=(
            "Compare RoPE providers (torch, torch_compile, triton with its default and tuned "
            "config, flashinfer, vllm, and select_rope) over batch size x sequence length x "
            "spec. Each is checked against a float64 reference, then timed; prints p50 "
            "[p20, p80], achieved TB/s and % of the floor (bytes moved / measured copy "
            "bandwidth), and writes a long-format CSV and PNG plots to --save-path."
        ),
        epilog=(
            "example: python -m autotune.bench --head-size 128 --rotary-dim 32 "
            "--is-neox-style --device cuda:0 --save-path ./rope_results/"
        ),
    )
    spec = parser.add_argument_group(
        "spec (explicit; default: head 128, rotary 32, NeoX, 32 and 48 heads)"
    )
    spec.add_argument(
        "--head-size",
        type=positive_int,
        help=f"elements per head, e.g. --head-size 128 (default {DEFAULT_GRID.head_size})",
    )
    spec.add_argument(
        "--rotary-dim",
        type=even_int,
        help="rotated elements per head, any even value up to the head size, e.g. "
        f"--rotary-dim 32 (default {DEFAULT_GRID.rotary_dim}, or the head size when smaller)",
    )
    add_int_list(
        spec,
        "--num-heads",
        help="query head counts, e.g. --num-heads 32 48 or --num-heads 32,48 "
        f"(default {' '.join(map(str, DEFAULT_GRID.num_heads))})",
    )
    add_int_list(
        spec,
        "--num-kv-heads",
        help="key head counts: one for every --num-heads value or one per value, e.g. "
        "--num-kv-heads 8 (default: equal to --num-heads)",
    )
    add_switch(
        spec,
        "--is-neox-style",
        default=None,
        help="NeoX style (rotate halves) or GPT-J style with --no-is-neox-style "
        "(default NeoX; with --model-config, the model's own)",
    )
    models = parser.add_argument_group("spec from a model (instead of the explicit spec)")
    models.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model preset of the tuner, repeatable, e.g. --model llama-3-8b "
        "(list: python -m autotune --list-models)",
    )
    models.add_argument(
        "--model-config",
        action="append",
        default=[],
        help="a Hugging Face config.json (or its directory), repeatable, e.g. "
        "--model-config ~/models/Llama-3-8B/config.json",
    )
    models.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        help="GPUs the model's heads are split over, e.g. --tensor-parallel-size 8 (default 1)",
    )
    grid = parser.add_argument_group("grid and measurement")
    grid.add_argument(
        "--dtype",
        type=dtype_list,
        metavar="DTYPES",
        help="q/k element types, comma list, e.g. --dtype bf16,fp16 (bfloat16, float16, float32 "
        "and their aliases bf16, fp16, half, fp32, float; default bfloat16, or the model "
        "config's own)",
    )
    add_int_list(
        grid,
        "--batch-size",
        default=DEFAULT_BATCH_SIZES,
        help="batch sizes, e.g. --batch-size 1 4 16 64 "
        f"(default {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    add_int_list(
        grid,
        "--seq-len",
        default=DEFAULT_SEQ_LENS,
        help="sequence lengths, e.g. --seq-len 64,512 "
        f"(default {' '.join(map(str, DEFAULT_SEQ_LENS))})",
    )
    grid.add_argument(
        "--providers",
        type=provider_list(all_provider_names),
        help=f"comma-separated, e.g. --providers triton,vllm (default all: "
        f"{','.join(all_provider_names())})",
    )
    grid.add_argument(
        "--device",
        help="e.g. --device cuda:0 or --device cpu (wall-time timing; default: the first CUDA "
        "device, else the CPU)",
    )
    grid.add_argument(
        "--timing",
        choices=TIMING_MODES,
        default="graph",
        help="graph: CUDA graph replay (what serving stacks run); eager: back-to-back calls, "
        "launch cost included; also the table entries select_rope follows, e.g. --timing eager "
        "(default graph)",
    )
    grid.add_argument(
        "--repeats",
        type=positive_int,
        default=50,
        help="timed rounds per measurement, e.g. --repeats 20 (default 50)",
    )
    add_switch(
        grid,
        "--rotate-buffers",
        default=True,
        help="rotate input sets covering 3x the L2 so data comes from HBM (default on); "
        "--no-rotate-buffers measures L2-resident inputs",
    )
    grid.add_argument(
        "--seed", type=seed, default=0, help="input seed, 0 to 2**32-1, e.g. --seed 1 (default 0)"
    )
    grid.add_argument(
        "--table-dir",
        type=Path,
        help="tuning table directory or .json file for select_rope and triton_tuned, e.g. "
        "--table-dir configs/ (default: select_rope's search path)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--save-path",
        default="./rope_results/",
        help=f"directory for {CSV_NAME} and the PNG plots, e.g. --save-path ./rope_results/ "
        "(default ./rope_results/)",
    )
    add_switch(
        out,
        "--plots",
        default=True,
        help="write PNG plots (default on), e.g. --no-plots",
    )
    add_switch(
        out,
        "--progress",
        default=True,
        help="progress bar on stderr (default on), e.g. --no-progress",
    )
    return parser


def specs_from_args(args: argparse.Namespace) -> list[RopeSpec]:
    """The specs the flags ask for: from ``--model``/``--model-config``, or explicit, the flags
    not given from :data:`DEFAULT_GRID` (:func:`autotune.cli_args.specs_from_args`).

    Raises:
        ValueError: flags that do not fit together, or a multimodal (mRoPE) model, which the
            bench does not measure; the message names them.
    """
    specs = _specs_from_args(args, grid=DEFAULT_GRID)
    mrope = [s.key for s in specs if s.is_mrope]
    if mrope:
        flag = "--model" if args.model else "--model-config"
        raise ValueError(
            f"{flag}: {mrope[0]} is multimodal RoPE (mRoPE); measure it with benchmarks/mrope.py"
        )
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad flags or no such device)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        specs = specs_from_args(args)
        save_path = check_output_dir(args.save_path, "--save-path")
        device = device_from_arg(args.device, purpose="benchmarking")
    except ValueError as exc:
        parser.error(str(exc))  # one line and exit status 2
    result = run_bench(
        specs,
        args.batch_size,
        args.seq_len,
        device,
        providers=args.providers,
        timing=args.timing,
        repeats=args.repeats,
        rotate=args.rotate_buffers,
        seed=args.seed,
        table_dir=args.table_dir,
        progress=args.progress,
    )
    print(format_table(result))
    skipped = format_skipped(result.skipped)
    if skipped:
        print("\n" + skipped)
    csv_path = write_csv(result.rows, save_path / CSV_NAME)
    print(f"\nwrote {csv_path}")
    if args.plots and result.rows:
        for path in plot_results(
            result.rows, save_path, copy_bandwidth=result.copy_bandwidth, title=result.device
        ):
            print(f"wrote {path}")
    return 0 if result.rows else 1
