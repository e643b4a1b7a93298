"""Checks that turn a bad command-line input into one line and exit status 2 before any work
starts: the one-line parser, the seed range, and writable output directories (the check of
:func:`kernels.table.check_output_dir`, whose result a command passes on so that it runs once)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from kernels.table import check_output_dir

__all__ = ["MAX_SEED", "OneLineParser", "check_output_dir", "seed"]

# Seeds reach numpy's generators through Optuna's samplers, which take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (``prog: error: message``) and
    exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def seed(text: str) -> int:
    """An argparse type: an integer from 0 to :data:`MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}")
    return value
