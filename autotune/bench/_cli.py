"""``python -m autotune.bench``: the command line over :func:`autotune.bench.run_bench`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from kernels import RopeSpec, parse_dtype

from .._device import DeviceError, resolve_device
from .._preflight import OneLineParser, check_output_dir, seed
from ._models import model_specs
from ._plots import plot_results
from ._report import CSV_NAME, format_skipped, format_table, write_csv
from ._run import all_provider_names, run_bench

__all__ = ["build_parser", "main", "specs_from_args"]

logger = logging.getLogger("autotune.bench")

# The default grid: that of vLLM's benchmarks/kernels/benchmark_rope.py.
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
DEFAULT_SEQ_LENS = (64, 128, 256, 512)
DEFAULT_NUM_HEADS = (32, 48)
DEFAULT_HEAD_SIZE = 128
DEFAULT_ROTARY_DIM = 32


def _positive_ints(text: str) -> list[int]:
    """``"1,4"`` or ``"16"`` -> ints; argparse shows the message on a bad value."""
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected positive integers like 1,4, got {text!r}")
        values.append(value)
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _even_int(text: str) -> int:
    value = _positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even number, got {value}")
    return value


def _dtype(text: str) -> torch.dtype:
    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _providers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = all_provider_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected names among {','.join(known)}, got {text!r}")
    return names


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
        type=_positive_int,
        help=f"elements per head, e.g. --head-size 128 (default {DEFAULT_HEAD_SIZE})",
    )
    spec.add_argument(
        "--rotary-dim",
        type=_even_int,
        help="rotated elements per head, any even value up to the head size, e.g. "
        f"--rotary-dim 32 (default {DEFAULT_ROTARY_DIM}, or the head size when smaller)",
    )
    spec.add_argument(
        "--num-heads",
        type=_positive_ints,
        nargs="+",
        help="query head counts, e.g. --num-heads 32 48 or --num-heads 32,48 "
        f"(default {' '.join(map(str, DEFAULT_NUM_HEADS))})",
    )
    spec.add_argument(
        "--num-kv-heads",
        type=_positive_ints,
        nargs="+",
        help="key head counts: one for every --num-heads value or one per value, e.g. "
        "--num-kv-heads 8 (default: equal to --num-heads)",
    )
    spec.add_argument(
        "--is-neox-style",
        action=argparse.BooleanOptionalAction,
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
        type=_positive_int,
        help="GPUs the model's heads are split over, e.g. --tensor-parallel-size 8 (default 1)",
    )
    grid = parser.add_argument_group("grid and measurement")
    grid.add_argument(
        "--dtype",
        type=_dtype,
        nargs="+",
        help="q/k element types, e.g. --dtype bf16 fp16 (bfloat16, float16, float32 and their "
        "aliases bf16, fp16, half, fp32, float; default bfloat16, or the model config's own)",
    )
    grid.add_argument(
        "--batch-size",
        type=_positive_ints,
        nargs="+",
        help="batch sizes, e.g. --batch-size 1 4 16 64 "
        f"(default {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    grid.add_argument(
        "--seq-len",
        type=_positive_ints,
        nargs="+",
        help="sequence lengths, e.g. --seq-len 64,512 "
        f"(default {' '.join(map(str, DEFAULT_SEQ_LENS))})",
    )
    grid.add_argument(
        "--providers",
        type=_providers,
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
        choices=("graph", "eager"),
        default="graph",
        help="graph: CUDA graph replay (what serving stacks run); eager: back-to-back calls, "
        "launch cost included; also the table entries select_rope follows, e.g. --timing eager "
        "(default graph)",
    )
    grid.add_argument(
        "--repeats",
        type=_positive_int,
        default=50,
        help="timed rounds per measurement, e.g. --repeats 20 (default 50)",
    )
    grid.add_argument(
        "--rotate-buffers",
        action=argparse.BooleanOptionalAction,
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
    out.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write PNG plots (default on), e.g. --no-plots",
    )
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar on stderr (default on), e.g. --no-progress",
    )
    return parser


def _flat(chunks: Sequence[Sequence[int]] | None, default: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(v for chunk in chunks for v in chunk)) if chunks else list(default)


def specs_from_args(args: argparse.Namespace) -> list[RopeSpec]:
    """The specs the flags ask for: from ``--model``/``--model-config``, or explicit.

    Raises:
        ValueError: flags that do not fit together; the message names them.
    """
    dtypes = list(dict.fromkeys(args.dtype)) if args.dtype else None
    if args.model or args.model_config:
        explicit = [
            flag
            for flag, value in (
                ("--head-size", args.head_size),
                ("--rotary-dim", args.rotary_dim),
                ("--num-heads", args.num_heads),
                ("--num-kv-heads", args.num_kv_heads),
            )
            if value is not None
        ]
        if explicit:
            raise ValueError(f"{', '.join(explicit)}: not with --model/--model-config")
        if args.model and args.is_neox_style is not None:
            raise ValueError("--is-neox-style: a --model preset has its own style")
        return model_specs(
            args.model,
            args.model_config,
            tensor_parallel_size=args.tensor_parallel_size or 1,
            dtypes=dtypes,
            is_neox=args.is_neox_style,
        )
    if args.tensor_parallel_size is not None:
        raise ValueError("--tensor-parallel-size: applies to --model/--model-config only")
    head_size = args.head_size or DEFAULT_HEAD_SIZE
    rotary_dim = args.rotary_dim or min(DEFAULT_ROTARY_DIM, head_size)
    if rotary_dim > head_size:
        raise ValueError(
            f"--rotary-dim: expected an even number at most --head-size={head_size}, "
            f"got {rotary_dim}"
        )
    heads = _flat(args.num_heads, DEFAULT_NUM_HEADS)
    kv = _flat(args.num_kv_heads, ()) or heads
    if len(kv) == 1:
        kv = kv * len(heads)
    if len(kv) != len(heads):
        raise ValueError(
            f"--num-kv-heads: expected one value or one per --num-heads value ({len(heads)}), "
            f"got {len(kv)}"
        )
    for h, k in zip(heads, kv, strict=True):
        if h % k:
            raise ValueError(f"--num-kv-heads: expected a divisor of --num-heads {h}, got {k}")
    is_neox = True if args.is_neox_style is None else args.is_neox_style
    return [
        RopeSpec(head_size, rotary_dim, h, k, is_neox, dtype)
        for dtype in dtypes or [torch.bfloat16]
        for h, k in zip(heads, kv, strict=True)
    ]


def _device(requested: str | None) -> torch.device:
    try:
        return resolve_device(requested, purpose="benchmarking")
    except DeviceError as exc:  # main() turns ValueError into one line and exit status 2
        raise ValueError(f"--{exc}") from None
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad flags or no such device)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache notices
    try:
        specs = specs_from_args(args)
        save_path = check_output_dir(args.save_path, "--save-path")
        device = _device(args.device)
    except ValueError as exc:
        parser.error(str(exc))  # one line and exit status 2
    result = run_bench(
        specs,
        _flat(args.batch_size, DEFAULT_BATCH_SIZES),
        _flat(args.seq_len, DEFAULT_SEQ_LENS),
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
