"""What a RoPE provider is, and the registry that names them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._checks import check_positions_in_cache, check_rope_args
from .._spec import RopeSpec
from ..perf_features import CALL_FEATURES, call_features

__all__ = [
    "MROPE",
    "ROPE",
    "Provider",
    "ProviderStatus",
    "Restriction",
    "RopeFn",
    "cuda_only_reason",
    "fallback_providers",
    "get_provider",
    "list_providers",
    "provider_names",
    "reference_provider",
    "register_provider",
    "unregister_provider",
]

# A provider built for one spec and config: fn(positions, query, key, cos_sin_cache) -> None,
# rotating query and key in place. It trusts its caller to have checked the arguments.
RopeFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], None]

# The kinds of spec a provider computes (Provider.layouts): plain RoPE, multimodal RoPE.
ROPE = "rope"
MROPE = "mrope"

Config = dict[str, Any]


@dataclass(frozen=True)
class Restriction:
    """A rule a tunable provider's config must meet for a spec.

    Attributes:
        name: Short name.
        holds: ``holds(spec, config)``: whether the complete config meets the rule.
        reason: Why a config breaking it is out, formatted with ``spec``, ``config`` and the
            provider's :meth:`Provider.restriction_facts`.
    """

    name: str
    holds: Callable[[RopeSpec, Config], bool]
    reason: str


@dataclass(frozen=True)
class Provider:
    """A RoPE implementation behind the in-place contract (vLLM's ``rotary_embedding`` op).

    Subclasses override :meth:`unavailable_reason`, :meth:`unsupported_reason` and :meth:`build`;
    tunable ones also describe their space (:attr:`param_space`, :attr:`restrictions`,
    :meth:`default_config`) and their performance-model features (:meth:`feature_names`,
    :meth:`features`). Callers use :meth:`callable_for` (checked, cached) or :meth:`apply`
    (every check, one call). The selector, the tuner and the model read providers only
    through these, so a new provider describes itself by registering.

    Attributes:
        name: Registry name.
        description: One line for listings.
        param_space: Tunable parameters, each with its allowed values (the tuner's search
            space). Empty when there is nothing to tune.
        revision: Bumped when a change to the kernel or its parameter space makes earlier
            measurements stale: the tuner names its studies by it, so a rerun measures afresh
            instead of resuming from the old kernel's timings.
        restrictions: Rules a config of the space must also meet for a spec
            (:meth:`config_problems`).
        fallback_on: Device types (``"cuda"``) where this provider, with its default config
            for the bucket, is the untuned choice when no table entry or model applies
            (:func:`fallback_providers`); it must be available and support the call there.
        reference: Runs every spec on every device: the last resort of a selection
            (:func:`reference_provider`).
        layouts: The kinds of spec it computes: ``"rope"`` (plain RoPE) and/or ``"mrope"``
            (multimodal, :attr:`RopeSpec.mrope_section` set); the base
            :meth:`unsupported_reason` refuses the others.
    """

    name: str
    description: str
    param_space: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    revision: int = 1
    restrictions: tuple[Restriction, ...] = ()
    fallback_on: tuple[str, ...] = ()
    reference: bool = False
    layouts: tuple[str, ...] = (ROPE,)
    # build() results per (spec, config), filled by callable_for().
    _callables: dict[tuple[RopeSpec, tuple[tuple[str, type, Any], ...] | None], RopeFn] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- what a subclass describes -------------------------------------------------------------
    def unavailable_reason(self, device: torch.device | str) -> str | None:
        """Why this provider cannot run on ``device``, or None when it can."""
        if torch.device(device).type == "cuda":
            return cuda_only_reason(device)
        return None

    def unsupported_reason(self, spec: RopeSpec, *, has_key: bool = True) -> str | None:
        """Why this provider cannot compute ``spec``, or None when it can. The base checks the
        spec's kind against :attr:`layouts`; an override calls it first."""
        layout = MROPE if spec.is_mrope else ROPE
        if layout not in self.layouts:
            return f"computes {' and '.join(self.layouts)} specs only, not {layout}"
        return None

    def default_config(self, spec: RopeSpec, num_tokens: int | None = None) -> Config:
        """The config to use when no tuning table has one (empty for untunable providers)."""
        return {}

    def restriction_facts(self, spec: RopeSpec, config: Config) -> dict[str, Any]:
        """Values the :attr:`restrictions`' reasons are formatted with (beside ``spec`` and
        ``config``)."""
        return {}

    def feature_names(self) -> tuple[str, ...]:
        """The names of :meth:`features`, in order: the call's own
        (:data:`kernels.perf_features.CALL_FEATURES`), then any of the config's."""
        return CALL_FEATURES

    def features(
        self,
        spec: RopeSpec,
        num_tokens: int,
        config: Mapping[str, Any] | None = None,
        *,
        sm_count: int,
    ) -> list[float]:
        """The performance model's features of one call (order of :meth:`feature_names`).

        Args:
            num_tokens: At least 1.
            config: A complete config; tunable providers need it, others ignore it.
            sm_count: The device's streaming multiprocessors (1 when unknown, as for a CPU).
        """
        return call_features(spec, num_tokens)

    def config_fault(self, config: Mapping[str, Any]) -> str | None:
        """Why ``config`` (possibly partial) is off :attr:`param_space`, or None.

        A value must be one of the allowed values *of the same type*: ``4.0`` and ``True`` are
        not ``4`` (they compare equal but would fail or mean something else in a kernel).
        """
        unknown = sorted(set(config) - set(self.param_space))
        if unknown:
            return (
                f"{self.name} has no parameter {unknown}; its parameters are "
                f"{sorted(self.param_space)}"
            )
        for name, value in config.items():
            allowed = self.param_space[name]
            if not any(type(value) is type(a) and value == a for a in allowed):
                return f"{self.name} parameter {name!r} takes one of {list(allowed)}, got {value!r}"
        return None

    def config_problems(self, spec: RopeSpec, config: Config) -> list[str]:
        """The reasons of every :attr:`restrictions` rule the complete ``config`` breaks for
        ``spec``; empty when none."""
        broken = [r for r in self.restrictions if not r.holds(spec, config)]
        if not broken:
            return []
        facts = self.restriction_facts(spec, config)
        return [r.reason.format(spec=spec, config=config, **facts) for r in broken]

    def check_config(self, spec: RopeSpec, config: Mapping[str, Any] | None) -> Config:
        """Return ``config`` completed with defaults, or raise ValueError naming the fault (a
        parameter off :attr:`param_space`, or a broken restriction)."""
        full = self.default_config(spec)
        if config:
            fault = self.config_fault(config)
            if fault is not None:
                raise ValueError(f"config: {fault}")
            full.update(config)
        problems = self.config_problems(spec, full)
        if problems:
            raise ValueError(f"config: invalid for {spec.key}: " + "; ".join(problems))
        return full

    def candidates(self, spec: RopeSpec) -> list[Config]:
        """Every config of :attr:`param_space` that meets the restrictions for ``spec``, in the
        product order of the sorted parameter names (``[{}]`` when there is nothing to tune)."""
        names = sorted(self.param_space)
        out = []
        for values in itertools.product(*(self.param_space[n] for n in names)):
            config = dict(zip(names, values, strict=True))
            if not self.config_problems(spec, config):
                out.append(config)
        return out

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        """Make a callable for ``spec`` and a checked, complete ``config`` that does the least
        work per call (the provider author's hook; callers use :meth:`callable_for`)."""
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------------
    @property
    def tunable(self) -> bool:
        """Whether there is a config to choose (:attr:`param_space` not empty)."""
        return bool(self.param_space)

    def supports(self, spec: RopeSpec, *, has_key: bool = True) -> bool:
        return self.unsupported_reason(spec, has_key=has_key) is None

    def callable_for(self, spec: RopeSpec, config: Mapping[str, Any] | None = None) -> RopeFn:
        """Check ``spec`` and ``config`` once and return the built callable (cached per spec and
        config). The callable checks nothing per call: give it tensors of ``spec``.

        Raises:
            ValueError: this provider does not support ``spec``, or ``config`` is invalid.
        """
        asked = (spec, _config_key(config) if config else None)
        fn = self._callables.get(asked)
        if fn is not None:
            return fn
        reason = self.unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"spec: {self.name} does not support {spec.key}: {reason}")
        full = self.check_config(spec, config)
        resolved = (spec, _config_key(full))
        fn = self._callables.get(resolved) or self.build(spec, full)
        self._callables[asked] = self._callables[resolved] = fn
        return fn

    def apply(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
        *,
        head_size: int,
        is_neox: bool,
        config: Mapping[str, Any] | None = None,
        mrope_section: tuple[int, int, int] | None = None,
        mrope_interleaved: bool = False,
    ) -> None:
        """Rotate ``query`` and ``key`` in place, after every check of the arguments, including
        that positions lie in the cache (which reads them: a host-device sync on CUDA).

        Args:
            positions: int64 or int32, ``[T]`` or ``[B, S]``; with ``mrope_section``, ``[3, T]``
                (time, height, width; the last dimension contiguous) or ``[T]`` (text only).
            query: ``[T, Hq*D]``, ``[T, Hq, D]``, ``[B, S, Hq*D]`` or ``[B, S, Hq, D]`` in
                float16, bfloat16 or float32; strided views allowed, last dimension contiguous.
            key: The same layout with ``Hk`` heads (``Hq`` a multiple of ``Hk``), or None.
            cos_sin_cache: ``[max_position, rotary_dim]``, cos half then sin half; float32 or
                the query's dtype.
            head_size: ``D``.
            is_neox: NeoX (rotate halves) or GPT-J (rotate interleaved pairs) style.
            config: Provider parameters; None for the default.
            mrope_section: Multimodal RoPE: frequencies per position stream (three ints summing
                to ``rotary_dim // 2``); None for plain RoPE.
            mrope_interleaved: The sections interleave ``THWTHW...`` (Qwen3-VL) instead of
                lying in chunks (:func:`kernels.mrope_stream_map`).

        Raises:
            TypeError, ValueError: an argument breaks the contract (the message names it),
                a position is outside the cache, this provider does not support the spec, or
                cannot run on the query's device.
        """
        spec, _, _ = check_rope_args(
            positions, query, key, cos_sin_cache, head_size, is_neox,
            mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
        )  # fmt: skip
        if key is None:
            reason = self.unsupported_reason(spec, has_key=False)
            if reason is not None:
                raise ValueError(f"key: {self.name} cannot take key=None: {reason}")
        # Before building: building for an unavailable provider fails obscurely or not at all.
        reason = self.unavailable_reason(query.device)
        if reason is not None:
            raise ValueError(f"query: {self.name} cannot run on {query.device}: {reason}")
        check_positions_in_cache(positions, cos_sin_cache)
        self.callable_for(spec, config)(positions, query, key, cos_sin_cache)


def cuda_only_reason(device: torch.device | str) -> str | None:
    """Why a provider that runs on CUDA devices alone cannot run on ``device``, or None."""
    if torch.device(device).type != "cuda":
        return "runs on CUDA devices only"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _config_key(config: Mapping[str, Any]) -> tuple[tuple[str, type, Any], ...]:
    # With each value's type: 4.0 == 4 and hashes alike, but must not find 4's callable.
    return tuple(sorted((name, type(value), value) for name, value in config.items()))


class ProviderStatus(NamedTuple):
    """A provider's name, whether it runs on the asked device, and why not when it does not."""

    name: str
    available: bool
    reason: str | None


_REGISTRY: dict[str, Provider] = {}


def register_provider(provider: Provider) -> Provider:
    """Add ``provider`` to the registry under its name and return it.

    Raises:
        ValueError: a different provider already has that name.
    """
    existing = _REGISTRY.get(provider.name)
    if existing is not None and type(existing) is not type(provider):
        raise ValueError(f"provider: {provider.name!r} is already registered as {existing!r}")
    _REGISTRY[provider.name] = provider
    return provider


def unregister_provider(name: str) -> Provider:
    """Remove the provider called ``name`` from the registry and return it (tests, plugins).

    Raises:
        KeyError: no such provider.
    """
    provider = get_provider(name)
    del _REGISTRY[name]
    return provider


def provider_names() -> list[str]:
    """Registered provider names, in registration order."""
    return list(_REGISTRY)


def get_provider(name: str) -> Provider:
    """Return the registered provider called ``name``.

    Raises:
        KeyError: no such provider; the message lists those registered.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"provider: no provider named {name!r}; registered: {provider_names()}"
        ) from None


def fallback_providers(device: torch.device | str) -> list[Provider]:
    """The providers whose default config is the untuned choice on ``device``'s type
    (:attr:`Provider.fallback_on`), in registration order."""
    device_type = torch.device(device).type
    return [p for p in _REGISTRY.values() if device_type in p.fallback_on]


def reference_provider() -> Provider:
    """The first registered provider that runs every spec on every device
    (:attr:`Provider.reference`).

    Raises:
        LookupError: none is registered.
    """
    for provider in _REGISTRY.values():
        if provider.reference:
            return provider
    raise LookupError(f"provider: no reference provider registered; registered: {provider_names()}")


def list_providers(device: torch.device | str = "cpu") -> list[ProviderStatus]:
    """Every registered provider with its availability on ``device``."""
    statuses = []
    for name, provider in _REGISTRY.items():
        reason = provider.unavailable_reason(device)
        statuses.append(ProviderStatus(name, reason is None, reason))
    return statuses
