"""What every command line of the package shares: argument types, switches, the
``--verbose/--quiet`` logging, device flags and the specs the spec flags ask for.

Used by ``python -m autotune`` (:mod:`autotune.cli`), its ``export`` and ``verify`` commands
(:mod:`autotune.verify_cli`), ``python -m autotune.bench`` and
``python -m autotune.perf_model_fit``. Argument types raise :class:`argparse.ArgumentTypeError`,
which a :class:`OneLineParser` reports as ``prog: error: argument --flag: message`` and exit
status 2; the other functions raise ``ValueError`` with a message that names the flag.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from kernels import RopeSpec, parse_dtype, provider_names
from kernels.table import TIMING_MODES

from ._device import DeviceError, resolve_device
from ._preflight import OneLineParser, seed
from .models import (
    CPU_DEFAULT_MODELS,
    DEFAULT_DTYPES,
    MODEL_PRESETS,
    default_specs,
    model_specs,
    parse_tokens,
    shard_heads,
    unique_specs,
)

__all__ = [
    "FlatList",
    "OneLineParser",
    "SpecGrid",
    "add_int_list",
    "add_logging_flags",
    "add_switch",
    "comma_list",
    "device_from_arg",
    "dtype_list",
    "even_int",
    "logging_from_args",
    "mrope_section",
    "positive_int",
    "positive_int_list",
    "provider_list",
    "seed",
    "setup_logging",
    "specs_from_args",
    "timing_list",
    "token_list",
]

# -- argument types ------------------------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (blank items dropped; may be empty)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def positive_int(text: str) -> int:
    """An integer above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def even_int(text: str) -> int:
    """A positive even integer (a rotary dimension)."""
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even number, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """``"1,4"`` or ``"16"`` -> positive integers, in the order given."""
    try:
        return [positive_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 1,4, got {text!r}"
        ) from None


def mrope_section(text: str) -> tuple[int, int, int]:
    """``"16,24,24"`` -> a multimodal RoPE section: three non-negative integers (time, height,
    width frequencies)."""
    items = text.split(",")
    try:
        values = tuple(int(item) for item in items)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected three non-negative integers like 16,24,24, got {text!r}"
        )
    return values


def token_list(text: str) -> list[int]:
    """Token buckets (:func:`autotune.models.parse_tokens`): sorted, without repeats."""
    try:
        return parse_tokens(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dtype_list(text: str) -> list[torch.dtype]:
    """``"bf16,fp16"`` -> element types without repeats; the names of
    :func:`kernels.parse_dtype` (``bfloat16``, ``bf16``, ``float16``, ``fp16``, ``half``...)."""
    items = comma_list(text)
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list like bf16,fp16, got {text!r}")
    try:
        return list(dict.fromkeys(parse_dtype(item) for item in items))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def provider_list(
    known: Callable[[], Sequence[str]] = provider_names,
) -> Callable[[str], list[str]]:
    """An argument type for a comma list of names among ``known()`` (default: the registered
    providers), without repeats. ``known`` is called when parsing, so providers registered
    after the parser was built count."""

    def providers(text: str) -> list[str]:
        names = list(dict.fromkeys(comma_list(text)))
        allowed = list(known())
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(
                f"expected a comma list of names among {','.join(allowed)}, got {text!r}"
            )
        return names

    return providers


def timing_list(text: str) -> list[str]:
    """``"graph"``, ``"eager"`` or both as a comma list, without repeats."""
    modes = list(dict.fromkeys(comma_list(text)))
    if not modes or any(m not in TIMING_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"expected graph, eager or graph,eager, got {text!r}")
    return modes


class FlatList(argparse.Action):
    """For ``nargs="+"`` with a list type such as :func:`positive_int_list`: the values as one
    list without repeats, so ``--seq-len 64 128,512`` is ``[64, 128, 512]``. A repeated flag
    replaces the earlier one, as a plain flag does."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, list(dict.fromkeys(v for chunk in values for v in chunk)))


# -- switches and logging ------------------------------------------------------------------------


def add_switch(parser: Any, flag: str, *, default: bool | None, help: str) -> None:
    """Add ``--flag`` and ``--no-flag`` to ``parser`` (or an argument group)."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_int_list(
    parser: Any, flag: str, *, default: Sequence[int] | None = None, help: str
) -> None:
    """Add ``flag`` taking positive integers as values, comma lists or both
    (``--seq-len 64 128,512``): one flat list without repeats (:class:`FlatList`)."""
    parser.add_argument(
        flag,
        type=positive_int_list,
        nargs="+",
        action=FlatList,
        default=None if default is None else list(default),
        help=help,
    )


def add_logging_flags(parser: argparse.ArgumentParser, *, quiet: str) -> None:
    """Add ``--verbose`` and ``--quiet``; ``quiet`` says what else ``--quiet`` leaves out
    (e.g. ``"no progress bar"``). Read them back with :func:`logging_from_args`."""
    add_switch(
        parser,
        "--verbose",
        default=False,
        help="debug messages and Optuna's per-trial log, e.g. --verbose",
    )
    add_switch(parser, "--quiet", default=False, help=f"warnings only, {quiet}, e.g. --quiet")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr at DEBUG (``verbose``), WARNING (``quiet``) or INFO."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # Optuna's per-trial INFO lines would drown the progress bar; our own log says what matters.
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
    # Matplotlib's font cache notices and debug lines say nothing about the run.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def logging_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """:func:`setup_logging` from the flags of :func:`add_logging_flags`; both flags at once
    are a ``parser.error`` (one line, exit status 2)."""
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet exclude each other")
    setup_logging(args.verbose, args.quiet)


# -- devices -------------------------------------------------------------------------------------


def device_from_arg(
    text: str | None, *, flag: str = "--device", purpose: str = "tuning"
) -> torch.device:
    """The device a flag names (:func:`autotune._device.resolve_device`; None picks one).

    Raises:
        ValueError: the device is not a cuda or cpu device name, or not on this machine; the
            message starts with ``flag``.
    """
    try:
        return resolve_device(text, purpose=purpose)
    except (DeviceError, ValueError) as exc:
        raise ValueError(f"{flag}: {str(exc).removeprefix('device: ')}") from None


# -- specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecGrid:
    """A command's own explicit spec, for the spec flags it is not given (the bench's grid).

    Attributes:
        head_size: Elements per head without ``--head-size``.
        rotary_dim: Rotated elements without ``--rotary-dim`` (at most the head size).
        num_heads: Query head counts without ``--num-heads``.
        preset_dtypes: Element types of ``--model`` presets without ``--dtype``.
    """

    head_size: int
    rotary_dim: int
    num_heads: tuple[int, ...]
    preset_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)


_EXPLICIT_FLAGS = (
    ("--head-size", "head_size"),
    ("--rotary-dim", "rotary_dim"),
    ("--num-heads", "num_heads"),
    ("--num-kv-heads", "num_kv_heads"),
)


def specs_from_args(
    args: argparse.Namespace,
    device: torch.device | None = None,
    *,
    grid: SpecGrid | None = None,
) -> list[RopeSpec]:
    """The specs the spec flags ask for, without repeats.

    Reads ``model``, ``model_config``, ``tensor_parallel_size``, ``head_size``, ``rotary_dim``,
    ``num_heads`` and ``num_kv_heads`` (each an int or a list of ints), ``is_neox_style`` and
    ``dtype`` (a list, or None) from ``args``, and where the command has them
    ``mrope_section`` and ``mrope_interleaved`` (the explicit spec's multimodal layout); a
    missing ``--num-kv-heads`` is ``--num-heads``, one value applies to every ``--num-heads``
    value, and a missing ``--is-neox-style`` is NeoX (the model config's own for
    ``--model-config``).

    Without ``grid`` (the tuner), presets, model configs and an explicit spec (both
    ``--head-size`` and ``--num-heads``) combine, ``--tensor-parallel-size`` splits the heads of
    each, and no shape flag at all is the default space of ``device`` (still filtered by
    ``--dtype`` and ``--tensor-parallel-size``). With ``grid`` (the bench), the model flags or
    the explicit flags, not both; explicit flags not given come from ``grid``;
    ``--tensor-parallel-size`` applies to the models only (default 1).

    Raises:
        ValueError: flags that do not fit together; the message names them.
        TypeError: the default space is asked for and ``device`` is None.
    """
    given = [flag for flag, dest in _EXPLICIT_FLAGS if getattr(args, dest) is not None]
    has_models = bool(args.model or args.model_config)
    tp = args.tensor_parallel_size
    if grid is None:
        if given and (args.head_size is None or args.num_heads is None):
            raise ValueError(
                f"{', '.join(given)}: an explicit spec needs both --head-size and --num-heads"
            )
        explicit = bool(given)
    else:
        if has_models and given:
            raise ValueError(f"{', '.join(given)}: not with --model/--model-config")
        if not has_models and tp is not None:
            raise ValueError("--tensor-parallel-size: applies to --model/--model-config only")
        explicit, tp = not has_models, tp or 1
    if args.is_neox_style is not None and not (explicit or args.model_config):
        raise ValueError("--is-neox-style: applies to an explicit spec or --model-config")
    section = getattr(args, "mrope_section", None)
    if getattr(args, "mrope_interleaved", False) and section is None:
        raise ValueError("--mrope-interleaved: needs --mrope-section")
    if section is not None and not explicit:
        raise ValueError("--mrope-section: applies to an explicit spec")
    specs = model_specs(
        args.model or (),
        args.model_config or (),
        tensor_parallel_size=tp,
        dtypes=args.dtype,
        is_neox=args.is_neox_style,
        preset_dtypes=DEFAULT_DTYPES if grid is None else grid.preset_dtypes,
    )
    if explicit:
        # The tuner's explicit spec has both flags; its rotary dim defaults to the head size.
        base = grid or SpecGrid(args.head_size, args.head_size, ())
        specs += _explicit_specs(args, base, tp or 1)
    if not specs:
        if device is None:
            raise TypeError("specs_from_args: the default space needs a device")
        specs = _default_space(device, args.dtype, tp)
    return unique_specs(specs)


def _ints(value: int | Sequence[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _explicit_specs(args: argparse.Namespace, base: SpecGrid, tp: int) -> list[RopeSpec]:
    """The explicit spec flags' specs, ``base`` filling in the flags not given."""
    head_size = args.head_size or base.head_size
    rotary_dim = args.rotary_dim or min(base.rotary_dim, head_size)
    if rotary_dim > head_size:
        raise ValueError(
            f"--rotary-dim: expected an even number at most --head-size={head_size}, "
            f"got {rotary_dim}"
        )
    heads = _ints(args.num_heads) or list(base.num_heads)
    kv = _ints(args.num_kv_heads) or heads
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
    pairs = [shard_heads(h, k, tp) for h, k in zip(heads, kv, strict=True)]
    is_neox = True if args.is_neox_style is None else args.is_neox_style
    section = getattr(args, "mrope_section", None)
    layout = {
        "mrope_section": section,
        "mrope_interleaved": bool(getattr(args, "mrope_interleaved", False)),
    }
    if section is not None and sum(section) != rotary_dim // 2:
        raise ValueError(
            f"--mrope-section: expected sections summing to --rotary-dim / 2 = "
            f"{rotary_dim // 2}, got {','.join(map(str, section))}"
        )
    try:
        return [
            RopeSpec(head_size, rotary_dim, h, k, is_neox, dtype, **layout)
            for dtype in args.dtype or [torch.bfloat16]
            for h, k in pairs
        ]
    except ValueError as exc:  # a layout the interleaved rule cannot place
        raise ValueError(f"--mrope-section: {str(exc).removeprefix('mrope_section: ')}") from None


def _default_space(
    device: torch.device, dtypes: Sequence[torch.dtype] | None, tp: int | None
) -> list[RopeSpec]:
    """The default space of ``device``, in ``dtypes`` and at tensor-parallel size ``tp`` when
    given (instead of the space's own)."""
    specs = default_specs(device)
    if dtypes is None and tp is None:
        return specs
    wanted = sorted(set(dtypes or {s.dtype for s in specs}), key=str)
    presets = MODEL_PRESETS.values()
    if device.type == "cpu":
        presets = [MODEL_PRESETS[n] for n in CPU_DEFAULT_MODELS]
    return [s for p in presets for s in p.specs(wanted, None if tp is None else [tp])]
