"""``python -m autotune.bench``: see :mod:`autotune.bench`."""

from ._cli import main

raise SystemExit(main())
