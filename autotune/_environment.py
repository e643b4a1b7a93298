"""What the tuner's command lines need from the Python environment, checked before anything
else is imported: the ``tune`` extra (optuna, tqdm, matplotlib), and rope-autotune's own
``kernels`` package rather than Hugging Face's kernel hub, which installs the same top-level
name."""

from __future__ import annotations

import importlib
import sys

__all__ = ["TUNE_EXTRA_MODULES", "environment_problem", "require_environment"]

# The modules of the ``tune`` extra in pyproject.toml.
TUNE_EXTRA_MODULES = ("optuna", "tqdm", "matplotlib", "sklearn")
INSTALL_TUNE_EXTRA = "pip install 'rope-autotune[tune]'"


def environment_problem() -> str | None:
    """One line saying what is missing or wrong, or None when the tuner can run."""
    missing = []
    for name in TUNE_EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        return (
            f"the tuner needs {', '.join(missing)} (the 'tune' extra), not installed here: "
            f"{INSTALL_TUNE_EXTRA}"
        )
    try:
        kernels = importlib.import_module("kernels")
    except ImportError as exc:
        return f"cannot import kernels, rope-autotune's runtime ({exc}): pip install rope-autotune"
    if not getattr(kernels, "__rope_autotune__", False):
        where = getattr(kernels, "__file__", None) or getattr(kernels, "__path__", "?")
        return (
            f"the 'kernels' package imported from {where} is not rope-autotune's (Hugging "
            "Face's kernel hub installs the same name): uninstall it (pip uninstall kernels) or "
            "use an environment without it"
        )
    return None


def require_environment(prog: str) -> None:
    """Exit with status 2 and one line on stderr when :func:`environment_problem` finds one."""
    problem = environment_problem()
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
