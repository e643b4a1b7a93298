"""The measurement loop behind ``python -m autotune.bench``: which providers run, the
correctness gate, timing, and the floor each time is compared with."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernels import RopeSpec, get_provider, list_providers, select_rope
from kernels.measure import check_correct, copy_bandwidth, time_rope
from kernels.providers import RopeFn
from kernels.table import device_metadata, library_versions, read_table, spec_entries

__all__ = [
    "CSV_COLUMNS",
    "PSEUDO_PROVIDERS",
    "BenchResult",
    "Skipped",
    "all_provider_names",
    "measure_copy_bandwidth",
    "run_bench",
]

logger = logging.getLogger(__name__)

# Rows of the long-format CSV, in this order (documented in the package docstring).
CSV_COLUMNS: tuple[str, ...] = (
    "device",
    "torch",
    "triton",
    "cuda",
    "flashinfer",
    "vllm",
    "head_size",
    "rotary_dim",
    "num_heads",
    "num_kv_heads",
    "is_neox",
    "dtype",
    "batch_size",
    "seq_len",
    "num_tokens",
    "provider",
    "config",
    "p20_us",
    "p50_us",
    "p80_us",
    "tbps",
    "pct_floor",
)

# Names the bench measures beyond the registry's providers.
TRITON_TUNED = "triton_tuned"  # the Triton kernel with the table's config for the bucket
SELECT_ROPE = "select_rope"  # the selector's callable, dispatching by token count
PSEUDO_PROVIDERS: tuple[str, ...] = (TRITON_TUNED, SELECT_ROPE)

# Display order; registered providers not named here follow in registry order.
_ORDER = ("torch", "torch_compile", "triton", TRITON_TUNED, "flashinfer", "vllm", SELECT_ROPE)


def all_provider_names() -> list[str]:
    """Every name ``run_bench`` accepts in ``providers``: registered providers plus
    ``triton_tuned`` and ``select_rope``, in display order."""
    names = [p.name for p in list_providers("cpu")] + list(PSEUDO_PROVIDERS)
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(_ORDER)), names.index(n)))


@dataclass(frozen=True)
class Skipped:
    """A provider not timed, and why.

    Attributes:
        provider: The provider name.
        reason: One line.
        spec_key: The spec it was skipped for; None when skipped for every spec.
        num_tokens: The token count it was skipped at; None when skipped at every count.
    """

    provider: str
    reason: str
    spec_key: str | None = None
    num_tokens: int | None = None

    def __str__(self) -> str:
        where = [w for w in (self.spec_key, self.num_tokens and f"{self.num_tokens} tokens") if w]
        return f"{self.provider}{' (' + ', '.join(where) + ')' if where else ''}: {self.reason}"


@dataclass
class BenchResult:
    """What :func:`run_bench` measured.

    Attributes:
        rows: One dict per (spec, batch size, sequence length, provider), keys
            :data:`CSV_COLUMNS`.
        skipped: Providers not timed, with the reason (unavailable, unsupported, failed the
            correctness gate, no tuned config, or an error while running).
        copy_bandwidth: Measured copy bandwidth in bytes/s (read plus write) defining the floor.
        device: The device measured on.
        timing: ``"graph"`` or ``"eager"``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    copy_bandwidth: float = math.nan
    device: str = ""
    timing: str = "graph"


def measure_copy_bandwidth(device: torch.device | str) -> float:
    """Copy bandwidth of ``device`` in bytes/s, read plus write (64 MiB on the CPU: past its
    caches and quick to fill; 1 GiB on CUDA)."""
    device = torch.device(device)
    return copy_bandwidth(device) if device.type == "cuda" else copy_bandwidth(device, 1 << 26)


@dataclass(frozen=True)
class _Candidate:
    """One provider bound for one spec and token count, ready to check and time."""

    fn: RopeFn
    config: str


# A resolver returns the candidate for (spec, num_tokens), or a Skipped saying why not.
_Resolver = Callable[[RopeSpec, int], "_Candidate | Skipped"]


def _config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True) if config else ""


def _registered_resolver(name: str) -> _Resolver:
    provider = get_provider(name)

    def resolve(spec: RopeSpec, num_tokens: int) -> _Candidate | Skipped:
        reason = provider.unsupported_reason(spec)
        if reason is not None:
            return Skipped(name, f"does not support this spec: {reason}", spec.key)
        config = provider.check_config(spec, provider.default_config(spec, num_tokens))
        return _Candidate(provider.callable_for(spec, config), _config_text(config))

    return resolve


def _selector_for(
    spec: RopeSpec, device: torch.device, timing: str, table_dir: str | Path | None, cache: dict
):
    """``select_rope`` for ``spec``, built once; its warnings (no table, stale table) logged."""
    if spec not in cache:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache[spec] = select_rope(
                spec.head_size,
                spec.rotary_dim,
                spec.num_heads,
                spec.num_kv_heads,
                spec.is_neox,
                spec.dtype,
                device,
                timing=timing,
                table_dir=table_dir,
            )
        for warning in caught:
            logger.warning("%s", warning.message)
    return cache[spec]


def _select_rope_resolver(
    device: torch.device, timing: str, table_dir: str | Path | None, cache: dict
) -> _Resolver:
    def resolve(spec: RopeSpec, num_tokens: int) -> _Candidate | Skipped:
        selector = _selector_for(spec, device, timing, table_dir, cache)
        choice = selector.explain(num_tokens)
        config = f"{choice.provider} {_config_text(dict(choice.config))}".strip()
        return _Candidate(selector, config)

    return resolve


def _triton_tuned_resolver(
    device: torch.device, timing: str, table_dir: str | Path | None, cache: dict
) -> _Resolver:
    """The Triton kernel with the config the table records for the spec's bucket.

    The selector says which table file, spec entry and bucket serve the call; the entry is read
    from that file, so a winner that is not Triton (the table keeps only the winner's config)
    is reported rather than replaced by the default config.
    """
    triton = get_provider("triton")
    tables: dict[Path, dict] = {}

    def resolve(spec: RopeSpec, num_tokens: int) -> _Candidate | Skipped:
        selector = _selector_for(spec, device, timing, table_dir, cache)
        choice = selector.explain(num_tokens)
        if choice.source is None:
            return Skipped(TRITON_TUNED, f"no {timing} table entry for this spec", spec.key)
        if choice.source not in tables:
            tables[choice.source] = read_table(choice.source)
        entry = spec_entries(tables[choice.source], timing, choice.spec_key)[choice.bucket]
        if entry.provider != "triton":
            return Skipped(
                TRITON_TUNED,
                f"the table's winner at bucket {choice.bucket} is {entry.provider}; "
                "it records no tuned Triton config there",
                spec.key,
                num_tokens,
            )
        config = triton.check_config(spec, entry.config or {})
        text = _config_text(config)
        if choice.spec_key != spec.key:
            text += f" (from {choice.spec_key})"
        return _Candidate(triton.callable_for(spec, config), text)

    return resolve


def _resolvers(
    providers: Sequence[str], device: torch.device, timing: str, table_dir: str | Path | None
) -> tuple[dict[str, _Resolver], list[Skipped]]:
    """A resolver per provider that can run on ``device``, and the skips of those that cannot."""
    known = all_provider_names()
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; expected some of {known}")
    available = {s.name: s.reason for s in list_providers(device)}
    available[SELECT_ROPE] = None
    available[TRITON_TUNED] = available.get("triton")
    selectors: dict[RopeSpec, Any] = {}
    resolvers: dict[str, _Resolver] = {}
    skipped = []
    for name in providers:
        if available[name] is not None:
            skipped.append(Skipped(name, f"unavailable on {device}: {available[name]}"))
        elif name == SELECT_ROPE:
            resolvers[name] = _select_rope_resolver(device, timing, table_dir, selectors)
        elif name == TRITON_TUNED:
            resolvers[name] = _triton_tuned_resolver(device, timing, table_dir, selectors)
        else:
            resolvers[name] = _registered_resolver(name)
    return resolvers, skipped


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_bench(
    specs: Iterable[RopeSpec],
    batch_sizes: Sequence[int],
    seq_lens: Sequence[int],
    device: torch.device | str,
    *,
    providers: Sequence[str] | None = None,
    timing: str = "graph",
    repeats: int = 50,
    rotate: bool = True,
    seed: int = 0,
    table_dir: str | Path | None = None,
    progress: bool = False,
) -> BenchResult:
    """Check and time RoPE providers over a grid of specs, batch sizes and sequence lengths.

    Each call gets ``num_tokens = batch_size * seq_len`` tokens: positions ``[T]`` and q/k as
    ``[T, H*D]`` strided views of a fused qkv tensor (:func:`kernels.measure.make_inputs`), so
    every provider rotates tokens as tokens. A token count reached by several (batch, sequence)
    pairs is measured once and reported on each pair's row. Per spec, token count and provider:
    the float64 correctness gate on fresh inputs (:func:`kernels.measure.check_correct`), then
    :func:`kernels.measure.time_rope`. A provider that fails the gate or raises is skipped at
    that point with the reason, never timed.

    Args:
        specs: The RoPE shapes (head layout, rotary dim, style, dtype).
        batch_sizes: Batch sizes ``B``.
        seq_lens: Sequence lengths ``S``.
        device: ``"cuda:0"``, ``"cpu"``... On the CPU, times are wall time.
        providers: Names from :func:`all_provider_names`; None for all of them.
        timing: ``"graph"`` (CUDA graph replay) or ``"eager"`` (host launch cost counts); also
            the table entries ``select_rope`` and ``triton_tuned`` follow.
        repeats: Timed rounds per measurement (median and p20/p80 over rounds).
        rotate: Rotate input sets covering 3x the L2 so that data comes from memory.
        seed: Seeds the inputs of the correctness gate and of timing.
        table_dir: Table directory or file for ``select_rope``/``triton_tuned``; None for
            ``select_rope``'s search path.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        A :class:`BenchResult`: rows keyed by :data:`CSV_COLUMNS`, skipped providers, the copy
        bandwidth of the floor.

    Raises:
        ValueError: an unknown provider, timing mode, or a non-positive size; or an mRoPE spec
            (its CSV rows have no layout columns: ``benchmarks/mrope.py`` measures mRoPE).
    """
    device = torch.device(device)
    specs = list(dict.fromkeys(specs))
    mrope = [s.key for s in specs if s.is_mrope]
    if mrope:
        raise ValueError(
            f"specs: {', '.join(mrope)} are multimodal (mRoPE); the bench measures plain RoPE, "
            "benchmarks/mrope.py measures mRoPE"
        )
    if timing not in ("graph", "eager"):
        raise ValueError(f"timing: expected 'graph' or 'eager', got {timing!r}")
    for name, values in (("batch_sizes", batch_sizes), ("seq_lens", seq_lens)):
        if not values or any(not isinstance(v, int) or v <= 0 for v in values):
            raise ValueError(f"{name}: expected positive ints, got {list(values)!r}")
    if not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    names = list(dict.fromkeys(providers)) if providers is not None else all_provider_names()
    resolvers, skipped = _resolvers(names, device, timing, table_dir)

    meta = device_metadata(device)
    versions = library_versions()
    bandwidth = measure_copy_bandwidth(device)
    logger.info("copy bandwidth on %s: %.3g TB/s", meta["device_name"], bandwidth / 1e12)
    pairs = [(b, s) for b in batch_sizes for s in seq_lens]
    token_counts = sorted({b * s for b, s in pairs})
    result = BenchResult(
        skipped=skipped, copy_bandwidth=bandwidth, device=meta["device_name"], timing=timing
    )
    steps = [(spec, n, name) for spec in specs for n in token_counts for name in resolvers]
    bar = _progress(len(steps), progress)
    spec_skipped: set[tuple[str, str]] = set()
    for spec, num_tokens, name in steps:
        bar.set_postfix_str(f"{spec.key} {num_tokens} {name}")
        if (name, spec.key) in spec_skipped:
            bar.update()
            continue
        timing_result = _measure(
            resolvers[name], name, spec, num_tokens, device, timing, repeats, rotate, seed
        )
        bar.update()
        if isinstance(timing_result, Skipped):
            logger.warning("skipping %s", timing_result)
            result.skipped.append(timing_result)
            if timing_result.num_tokens is None:
                spec_skipped.add((name, spec.key))
            continue
        config, measured = timing_result
        floor_bytes = spec.bytes_moved(num_tokens)
        tbps = floor_bytes / (measured.median_us * 1e-6) / 1e12
        for batch, seq in pairs:
            if batch * seq != num_tokens:
                continue
            result.rows.append(
                {
                    "device": meta["device_name"],
                    **{lib: versions.get(lib) for lib in CSV_COLUMNS[1:6]},
                    "head_size": spec.head_size,
                    "rotary_dim": spec.rotary_dim,
                    "num_heads": spec.num_heads,
                    "num_kv_heads": spec.num_kv_heads,
                    "is_neox": spec.is_neox,
                    "dtype": spec.dtype_name,
                    "batch_size": batch,
                    "seq_len": seq,
                    "num_tokens": num_tokens,
                    "provider": name,
                    "config": config,
                    "p20_us": measured.p20_us,
                    "p50_us": measured.median_us,
                    "p80_us": measured.p80_us,
                    "tbps": tbps,
                    "pct_floor": 100 * tbps * 1e12 / bandwidth,
                }
            )
    bar.close()
    return result


def _measure(resolve, name, spec, num_tokens, device, timing, repeats, rotate, seed):
    """(config text, Timing) of one provider at one spec and token count, or a Skipped."""
    try:
        candidate = resolve(spec, num_tokens)
        if isinstance(candidate, Skipped):
            return candidate
        check_correct(candidate.fn, spec, num_tokens, device, seed=seed + num_tokens)
    except AssertionError as exc:
        return Skipped(name, f"wrong result, not timed: {_one_line(exc)}", spec.key, num_tokens)
    except Exception as exc:  # compile failures, out of memory: reported, the bench goes on
        return Skipped(name, f"failed before timing: {_one_line(exc)}", spec.key, num_tokens)
    try:
        measured = time_rope(
            candidate.fn,
            spec,
            num_tokens,
            device,
            mode=timing,
            rotate=rotate,
            seed=seed,
            repeats=repeats,
        )
    except Exception as exc:
        return Skipped(name, f"failed while timing: {_one_line(exc)}", spec.key, num_tokens)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # rotating buffers of large counts: give them back
    return candidate.config, measured


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", leave=False, dynamic_ncols=True)
