"""``python -m autotune.bench``: see :mod:`autotune.bench`. The environment is checked first
(see :mod:`autotune._environment`)."""

from .._environment import require_environment

require_environment("python -m autotune.bench")

from ._cli import main  # noqa: E402  (after the check, which it needs)

raise SystemExit(main())
