"""Routes the performance model predicts (:mod:`kernels.perf_model`), built at selection time.

Two places use them: a spec the device's table lacks gets, per bucket, the provider and config
the model predicts fastest among those available here and supporting the call; a tuned spec's
token counts between two of its buckets get the faster (predicted) of the neighbouring buckets'
winners and the model's own pick (which must be predicted a margin faster, since the winners
were measured and it was not). The model file lies beside the table
(``NVIDIA_H200.model.json``) in the same search path (:func:`kernels.perf_model.find_model`);
a bad one warns once and is not used. A model transferred from another device
(:func:`kernels.perf_model.find_transferred_model`) says so in every route's ``why``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._routes import Availability, Route, try_route
from ._spec import RopeSpec
from .perf_model import PerfModel, choose_between_buckets
from .providers import get_provider

__all__ = ["between_route", "predicted_route"]


def _servable(
    model: PerfModel, spec: RopeSpec, has_key: bool, unavailable: Availability
) -> list[str]:
    return [
        name
        for name in model.providers
        if unavailable(name) is None
        and get_provider(name).unsupported_reason(spec, has_key=has_key) is None
    ]


def _predicted_by(model: PerfModel) -> str:
    return f"predicted by {model.source}" + (f" ({model.transfer})" if model.transfer else "")


def _route(
    spec: RopeSpec,
    bucket: int,
    provider: str,
    config: Mapping[str, Any] | None,
    has_key: bool,
    unavailable: Availability,
    why: str,
) -> Route | None:
    route, _ = try_route(provider, config, spec, bucket, has_key, unavailable)
    return None if route is None else Route(route.provider, route.config, route.fn, why)


def predicted_route(
    model: PerfModel, spec: RopeSpec, bucket: int, has_key: bool, unavailable: Availability
) -> Route | None:
    """The model's fastest pick at ``bucket`` tokens among the providers that can serve the
    call here; None when it knows none of them."""
    pick = model.best(spec, bucket, _servable(model, spec, has_key, unavailable))
    if pick is None:
        return None
    why = f"{_predicted_by(model)}: {pick.provider} at {pick.predicted_us:.3g} us"
    return _route(spec, bucket, pick.provider, pick.config, has_key, unavailable, why)


def between_route(
    model: PerfModel,
    spec: RopeSpec,
    bucket: int,
    neighbours: Mapping[int, Mapping[str, Any]],
    has_key: bool,
    unavailable: Availability,
) -> Route | None:
    """For ``bucket`` tokens between tuned buckets: the neighbouring entries' winners
    (``{tuned bucket: entry}``) and the model's pick, each predicted at ``bucket``."""
    winners = [(e["provider"], e.get("config") or None) for e in neighbours.values()]
    providers = _servable(model, spec, has_key, unavailable)
    pick = choose_between_buckets(model, spec, bucket, winners, providers)
    if pick is None:
        return None
    tuned = " and ".join(str(b) for b in neighbours)
    why = (
        f"between tuned buckets {tuned}, {_predicted_by(model)}: {pick.provider} at "
        f"{pick.predicted_us:.3g} us"
    )
    return _route(spec, bucket, pick.provider, pick.config, has_key, unavailable, why)
