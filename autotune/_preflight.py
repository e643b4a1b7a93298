"""Checks that turn a bad command-line input into one line and exit status 2 before any work
starts: the one-line parser, the seed range, and writable output directories."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

__all__ = [
    "MAX_SEED",
    "OneLineParser",
    "check_output_dir",
    "existing_ancestor",
    "seed",
    "unwritable_reason",
]

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


def existing_ancestor(path: Path) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (None when one can). A file is created and
    removed, so permission bits, ACLs, immutable flags and read-only mounts all count."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a directory that exists or can be created, and is writable.

    Args:
        path: The directory asked for.
        flag: The option named in the error, e.g. ``"--output"``.

    Raises:
        ValueError: ``path`` is empty, a file, under a file, or not writable.
    """
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{flag}: expected a directory, got an empty string")
    directory = Path(text).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag}: {directory} is a file, not a directory")
    ancestor = existing_ancestor(directory)
    if not ancestor.is_dir():
        raise ValueError(f"{flag}: {directory} is under a file ({ancestor})")
    reason = unwritable_reason(ancestor)
    if reason is not None:
        raise ValueError(f"{flag}: {ancestor} is not writable ({reason}); choose another directory")
    return directory
