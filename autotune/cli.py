"""``python -m autotune``: the command line over :func:`autotune.tune`; ``export``, ``verify``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kernels import provider_names
from kernels.table import user_config_dir

from ._device import DeviceError
from ._preflight import check_output_dir
from .cli_args import (
    OneLineParser,
    add_logging_flags,
    add_switch,
    comma_list,
    device_from_arg,
    dtype_list,
    even_int,
    logging_from_args,
    mrope_section,
    positive_int,
    provider_list,
    seed,
    specs_from_args,
    timing_list,
    token_list,
)
from .export import export_tables
from .models import CPU_DEFAULT_TOKENS, DEFAULT_TOKENS, MAX_TOKENS, MODEL_PRESETS
from .objective import SEARCH_REPEATS
from .report import format_summary
from .storage import default_storage_path, open_storage
from .tuning import tune
from .verify_cli import main as verify

__all__ = ["build_export_parser", "build_parser", "main", "specs_from_args"]

logger = logging.getLogger("autotune")


def build_parser() -> argparse.ArgumentParser:
    """The tuning command's parser."""
    parser = OneLineParser(
        prog="python -m autotune",
        description=(
            "Search RoPE providers and Triton kernel configs with Optuna for a model's shape "
            "space on one device, and write the device's tuning table. Without a shape flag, "
            "tunes the default space (popular models, bf16 and fp16, 1 to 65536 tokens; a "
            "trimmed one on the CPU)."
        ),
        epilog="Other commands (see their --help): python -m autotune export (write a table from "
        "a study storage), python -m autotune verify (re-time a table's winners on this device).",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device to tune, e.g. --device cuda:0 or --device cpu "
        "(default: the first CUDA device, else the CPU)",
    )
    parser.add_argument(
        "--devices",
        type=comma_list,
        default=None,
        help="one worker process per device on one shared study storage, e.g. --devices "
        "cuda:0,cuda:1 (or cpu,cpu); not with --device",
    )
    shapes = parser.add_argument_group("shapes (combine freely; none: the default space)")
    shapes.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="a model preset, repeatable, e.g. --model llama-3-8b "
        "--model phi-2 (see --list-models)",
    )
    shapes.add_argument(
        "--list-models",
        action="store_true",
        help="print the model presets and exit, e.g. --list-models",
    )
    shapes.add_argument(
        "--model-config",
        action="append",
        metavar="PATH",
        help="a Hugging Face config.json (or its directory), repeatable, "
        "e.g. --model-config ~/models/Llama-3-8B/config.json",
    )
    shapes.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        metavar="N",
        help="GPUs the heads are split over (vLLM's split), applied to every "
        "shape source, e.g. --tensor-parallel-size 4 (default: 1, or a "
        "preset's own sizes)",
    )
    shapes.add_argument(
        "--head-size",
        type=positive_int,
        help="explicit spec: elements per head, e.g. --head-size 128",
    )
    shapes.add_argument(
        "--rotary-dim",
        type=even_int,
        help="explicit spec: rotated elements per head, e.g. --rotary-dim 64 "
        "(default: the head size)",
    )
    shapes.add_argument(
        "--num-heads", type=positive_int, help="explicit spec: query heads, e.g. --num-heads 32"
    )
    shapes.add_argument(
        "--num-kv-heads",
        type=positive_int,
        help="explicit spec: key heads, e.g. --num-kv-heads 8 (default: --num-heads)",
    )
    add_switch(
        shapes,
        "--is-neox-style",
        default=None,
        help="rope style of the explicit spec or --model-config, e.g. "
        "--no-is-neox-style for GPT-J style (default: NeoX, or the "
        "model's own)",
    )
    shapes.add_argument(
        "--mrope-section",
        type=mrope_section,
        metavar="T,H,W",
        help="explicit spec: multimodal RoPE (Qwen2-VL family), the rotary frequencies taking "
        "their angle from the time, height and width positions, summing to --rotary-dim / 2, "
        "e.g. --mrope-section 16,24,24",
    )
    shapes.add_argument(
        "--mrope-interleaved",
        action="store_true",
        help="with --mrope-section: the sections interleave THWTHW... (Qwen3-VL), e.g. "
        "--mrope-section 24,20,20 --mrope-interleaved",
    )
    shapes.add_argument(
        "--dtype",
        type=dtype_list,
        metavar="DTYPES",
        help="element types, comma list of bfloat16/float16/float32 "
        "(bf16/fp16/fp32), e.g. --dtype bf16,fp16 (default: bf16,fp16; "
        "bf16 on the CPU; a config's torch_dtype)",
    )
    parser.add_argument(
        "--tokens",
        type=token_list,
        help=f"token buckets, 1 to {MAX_TOKENS} each, e.g. --tokens 1,16,256 (default: "
        f"1,2,4,...,65536; {','.join(map(str, CPU_DEFAULT_TOKENS))} on the CPU)",
    )
    parser.add_argument(
        "--providers",
        type=provider_list(),
        help=f"providers to search, e.g. --providers triton,vllm (default: "
        f"all of {','.join(provider_names())} that run here)",
    )
    parser.add_argument(
        "--trials",
        type=positive_int,
        help="counted trials per spec and bucket, e.g. --trials 64 (default: 16, or 48 on CUDA "
        "without a performance model for the device)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=SEARCH_REPEATS,
        metavar="N",
        help="timed rounds per measurement (the median over rounds is the trial's value), "
        f"e.g. --repeats 50 (default: {SEARCH_REPEATS})",
    )
    parser.add_argument(
        "--timing",
        type=timing_list,
        default=["graph"],
        help="timing mode(s): graph (CUDA graph replay), eager (host wall time "
        "per call), or both, e.g. --timing graph,eager",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="directory the table is merged into, e.g. --output configs "
        f"(default: {user_config_dir()}, where select_rope looks)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage shared by runs and workers, e.g. --storage "
        "postgresql://user@host/db or --storage ./studies.journal "
        f"(default: {default_storage_path()})",
    )
    parser.add_argument(
        "--save-path",
        default=None,
        metavar="DIR",
        help="also write every measurement as <device>.csv here, e.g. --save-path results/",
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="seed for the samplers and the random inputs, 0 to 2**32-1, e.g. --seed 0 "
        "(default: fresh randomness)",
    )
    add_logging_flags(parser, quiet="no progress bar or summary")
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    """The ``export`` command's parser."""
    parser = OneLineParser(
        prog="python -m autotune export",
        description="Write the tables of the studies in a storage (one file per device, merged "
        "into existing files), e.g. while workers are still tuning.",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="the Optuna storage, e.g. --storage postgresql://user@host/db "
        f"(default: {default_storage_path()})",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help=f"directory for the tables, e.g. --output configs (default: {user_config_dir()})",
    )
    add_switch(
        parser,
        "--include-partial",
        default=False,
        help="also use studies still short of their trial budget, e.g. --include-partial",
    )
    add_logging_flags(parser, quiet="no list of the written tables")
    return parser


def _list_models() -> str:
    lines = []
    for preset in MODEL_PRESETS.values():
        style = "neox" if preset.is_neox else "gptj"
        lines.append(
            f"{preset.name:<16} head {preset.head_size:>3}, rotary {preset.rotary_dim:>3}, "
            f"heads {preset.num_heads:>3}/{preset.num_kv_heads:<3} {style:<4} "
            f"TP {','.join(map(str, preset.tp_sizes)):<8} {preset.description}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0 done, 1 nothing measured (no study
    finished), 2 bad arguments, storage or output (one line, before any tuning), or no such
    device, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["export"], ["verify"]):  # commands with their own parsers
        return (_export if argv[0] == "export" else verify)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        print(_list_models())
        return 0
    logging_from_args(parser, args)
    if args.device is not None and args.devices is not None:
        parser.error("--device and --devices exclude each other")
    if args.devices is not None and not args.devices:
        parser.error("--devices: expected a comma list like cuda:0,cuda:1")
    output = user_config_dir() if args.output is None else args.output
    try:
        if args.devices is None:
            device = device_from_arg(args.device)
        else:
            device = device_from_arg(args.devices[0], flag="--devices")
        specs = specs_from_args(args, device)
        output = check_output_dir(output, "--output")  # tune() does not check it again
        if args.save_path is not None:
            args.save_path = check_output_dir(args.save_path, "--save-path")
        storage = open_storage(args.storage)  # a bad one fails here, before any tuning
    except ValueError as exc:
        parser.error(str(exc))
    tokens = args.tokens or (CPU_DEFAULT_TOKENS if device.type == "cpu" else DEFAULT_TOKENS)
    logger.info(
        "tuning %d specs x %d token buckets x %s on %s",
        len(specs),
        len(tokens),
        "+".join(args.timing),
        device if args.devices is None else ",".join(args.devices),
    )
    try:
        table = tune(
            specs,
            tokens,
            device=device if args.devices is None else None,
            devices=args.devices,
            providers=args.providers,
            trials=args.trials,
            timing=args.timing,
            storage=storage if args.devices is None else args.storage,  # workers reopen it
            output=output,
            save_path=args.save_path,
            seed=args.seed,
            progress=not args.quiet,
            time_kwargs={"repeats": args.repeats},
        )
    except KeyboardInterrupt:
        print("python -m autotune: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except (DeviceError, ValueError) as exc:
        parser.error(str(exc))
    if not any(table["entries"].values()):
        print(
            "python -m autotune: no study finished: nothing measured, nothing written (the "
            "warnings above say why the trials failed)",
            file=sys.stderr,
        )
        return 1
    if not args.quiet:
        print(format_summary(table))
    return 0


def _export(argv: Sequence[str]) -> int:
    parser = build_export_parser()
    args = parser.parse_args(argv)
    logging_from_args(parser, args)
    output = user_config_dir() if args.output is None else args.output
    try:
        check_output_dir(output, "--output")
        storage = open_storage(args.storage, create=False)
    except ValueError as exc:
        parser.error(str(exc))
    written = export_tables(storage, output, include_partial=args.include_partial)
    if not written:
        print(f"{parser.prog}: no finished study in the storage: nothing written", file=sys.stderr)
        return 1
    for device_name, path in written.items():
        if not args.quiet:
            print(f"{device_name}: {path}")
    return 0
