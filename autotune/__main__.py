"""``python -m autotune``: see :mod:`autotune.cli`. The environment is checked first, so a
missing ``tune`` extra or another package named ``kernels`` is one line, not a traceback."""

import sys

from ._environment import require_environment


def main() -> int:
    """Check the environment, then run :func:`autotune.cli.main`."""
    require_environment("python -m autotune")
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
