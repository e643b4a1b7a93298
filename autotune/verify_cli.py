"""``python -m autotune verify``: the command line over :mod:`autotune.verify`.

Exit status: 0 when every verified entry is right, 1 when any is failing, slower or beaten, 2 for
bad arguments or a table that cannot be read (one line), 130 when interrupted. ``--fix`` re-tunes
those buckets (in a fresh study storage unless ``--storage`` is given: the original run's studies
are complete, and would be resumed rather than re-measured) and merges them into the table; the
status is then 0 when every one got a new entry, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from optuna.storages import InMemoryStorage

from kernels import provider_names
from kernels.table import device_metadata, device_table_name, read_table

from ._preflight import check_output_dir
from .cli_args import (
    OneLineParser,
    add_logging_flags,
    comma_list,
    device_from_arg,
    logging_from_args,
    positive_int,
    provider_list,
    timing_list,
)
from .storage import open_storage
from .verify import (
    BEATEN_MARGIN,
    SLOWER_MARGIN,
    VERIFY_REPEATS,
    VERIFY_ROUND_S,
    Check,
    Verifier,
    default_table_path,
    fix_table,
    format_report,
    plan_checks,
    write_checks_csv,
)

__all__ = ["build_verify_parser", "main"]


def build_verify_parser() -> argparse.ArgumentParser:
    """The ``verify`` command's parser."""
    parser = OneLineParser(
        prog="python -m autotune verify",
        description="Re-time each table entry's winner and runner-up on this device, each through "
        "the float64 correctness gate first, and list the entries now failing, slower than "
        f"recorded by more than {SLOWER_MARGIN:.0%}, or beaten by the runner-up by more than "
        f"{BEATEN_MARGIN:.0%}. Exit status 0: all right; 1: some are not (with --fix: some could "
        "not be re-tuned); 2: bad arguments or an unreadable table.",
    )
    flags: tuple[tuple[str, dict[str, Any]], ...] = (
        ("--device", {"help": "device to verify on, e.g. --device cuda:0 (default: the first CUDA "
                      "device, else the CPU)"}),
        ("--table", {"metavar": "FILE", "help": "the table, e.g. --table configs/NVIDIA_H200.json "
                     "(default: the first one select_rope looks at for the device)"}),
        ("--timing", {"type": timing_list, "help": "only these timing modes, e.g. --timing graph "
                      "(default: every mode in the table)"}),
        ("--specs", {"type": comma_list, "metavar": "PATTERNS", "help": "only spec keys matching "
                     "these shell patterns, e.g. --specs 'q32_kv8_*,*_gptj_*' (default: all)"}),
        ("--repeats", {"type": positive_int, "default": VERIFY_REPEATS, "metavar": "N",
                       "help": "timed rounds per measurement, e.g. --repeats 20 (default: "
                       f"{VERIFY_REPEATS})"}),
        ("--save-path", {"metavar": "DIR", "help": "also write every re-timed contender as "
                         "<table name>_verify.csv here, e.g. --save-path results/"}),
        ("--fix", {"action": "store_true", "help": "re-tune the failing, slower and beaten buckets "
                   "and merge them into the table, e.g. --fix"}),
        ("--trials", {"type": positive_int, "help": "with --fix: counted trials per bucket, e.g. "
                      "--trials 32 (default: the tuner's)"}),
        ("--providers", {"type": provider_list(), "help": "with --fix: providers to search, e.g. "
                         "--providers triton,vllm (default: all that run here)"}),
        ("--storage", {"metavar": "URL", "help": "with --fix: Optuna storage for the re-tuning "
                       "studies, so that an interrupted fix resumes, e.g. --storage "
                       "./verify.journal (default: a fresh in-memory one; never the original "
                       "run's storage, whose complete studies would be resumed, not re-measured)"}),
    )  # fmt: skip
    for flag, kwargs in flags:
        parser.add_argument(flag, **kwargs)
    add_logging_flags(parser, quiet="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m autotune verify``; returns the exit status (see the module docstring)."""
    parser = build_verify_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.fix and (args.trials or args.providers or args.storage):
        parser.error("--trials, --providers and --storage apply to --fix")
    logging_from_args(parser, args)
    path, storage = args.table, None
    try:  # everything that can be wrong with the arguments, before anything is timed
        device = device_from_arg(args.device, purpose="verifying")
        path = default_table_path(device) if path is None else Path(path)
        table = read_table(path, provider_names())
        here, tuned_on = device_metadata(device)["device_name"], table["metadata"]["device_name"]
        if tuned_on != here:
            raise ValueError(f"{path} was tuned on {tuned_on!r}, this device is {here!r}")
        if args.fix:
            check_output_dir(path.parent, "--table")
            if path.name != device_table_name(here):
                raise ValueError(f"--fix merges into {device_table_name(here)}: rename {path}")
            storage = open_storage(args.storage) if args.storage else InMemoryStorage()
        if args.save_path is not None:
            check_output_dir(args.save_path, "--save-path")
        checks = plan_checks(table, device, timings=args.timing, spec_patterns=args.specs)
        if not checks:
            raise ValueError(f"no entry of {path} matches --timing and --specs")
    except FileNotFoundError as exc:
        parser.error(f"no table: {exc}")
    except OSError as exc:  # a table that cannot be read
        parser.error(f"{path}: {exc.strerror or exc}")
    except ValueError as exc:  # TableError is a ValueError
        parser.error(str(exc))
    try:
        return _run(args, device, path, checks, storage)
    except KeyboardInterrupt:
        done = " (buckets re-tuned so far are written)" if args.fix else ""
        print(f"{parser.prog}: interrupted{done}", file=sys.stderr)
        return 130


def _run(
    args: argparse.Namespace, device: torch.device, path: Path, checks: list[Check], storage: Any
) -> int:
    from tqdm.auto import tqdm

    verifier = Verifier(device, {"repeats": args.repeats, "min_round_s": VERIFY_ROUND_S})
    start = time.perf_counter()
    verifier.compile_ahead(checks)
    bar = tqdm(checks, unit="entry", disable=True if args.quiet else None, dynamic_ncols=True)
    for check in bar:
        verifier.run(check)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(verifier.phases.items()))
    print(f"verified {path} on {device} in {time.perf_counter() - start:.1f} s "
          f"({phases or 'nothing timed'}), {args.repeats} rounds per measurement")  # fmt: skip
    print(format_report(checks))
    if args.save_path is not None:
        csv_path = Path(args.save_path) / f"{path.stem}_verify.csv"
        print(f"measurements: {write_checks_csv(checks, csv_path)}")
    if not args.fix or not any(c.problems for c in checks):
        return 1 if any(c.problems for c in checks) else 0
    tune_kwargs = {"storage": storage, "trials": args.trials, "providers": args.providers,
                   "progress": not args.quiet}  # fmt: skip
    changed, missing = fix_table(checks, path, device, **tune_kwargs)
    print(f"re-tuned into {path}:")
    print("\n".join([f"  {line}" for line in changed] + [f"  not re-tuned: {m}" for m in missing]))
    return 1 if missing else 0
