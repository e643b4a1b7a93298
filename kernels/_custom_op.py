"""The selector's dispatch as a torch custom operator, so that ``torch.compile`` sees one opaque,
in-place op instead of tracing (and guarding on) the token-count dispatch.

The op cannot take a Python object, so each selector registers itself here and passes an int
handle: ``rope_autotune::rope(positions, query, key, cos_sin_cache, handle)``. The handle is a
constant in the compiled graph; the token count stays symbolic, so one graph serves every count.
Registered selectors live for the process (a compiled graph may hold their handle).
"""

import threading
from collections.abc import Callable

import torch

__all__ = ["register_dispatch", "rope_op"]

DispatchFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], None]

_DISPATCH: list[DispatchFn] = []
_LOCK = threading.Lock()


def register_dispatch(dispatch: DispatchFn) -> int:
    """Keep ``dispatch`` for the op and return its handle."""
    with _LOCK:
        _DISPATCH.append(dispatch)
        return len(_DISPATCH) - 1


@torch.library.custom_op("rope_autotune::rope", mutates_args=("query", "key"))
def rope_op(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    handle: int,
) -> None:
    """Rotate ``query`` and ``key`` in place with the selector registered under ``handle``."""
    _DISPATCH[handle](positions, query, key, cos_sin_cache)


@rope_op.register_fake
def _rope_fake(positions, query, key, cos_sin_cache, handle) -> None:
    # In place, no outputs: shapes and strides of query/key are unchanged.
    return None
