"""rope-autotune's runtime: RoPE providers, the tuning-table reader and the selector.

Stays light: imports torch, triton, orjson, platformdirs and filelock, never the tuner's
libraries (optuna, matplotlib, tqdm). Test helpers (a float64 reference, tolerances) live in
:mod:`kernels.testing`; the table format and its safe writing in :mod:`kernels.table`.

The top-level name ``kernels`` is also used by Hugging Face's kernel-hub package; this one
carries ``__rope_autotune__ = True`` so that callers can tell them apart.
"""

from ._cos_sin_cache import cos_sin_cache
from ._lookup import nearest_spec_key
from ._spec import DTYPE_NAMES, RopeSpec, mrope_stream_map, parse_dtype
from .providers import (
    Provider,
    ProviderStatus,
    get_provider,
    list_providers,
    provider_names,
    register_provider,
    unregister_provider,
)
from .selector import Explanation, RopeSelector, RopeTableWarning, select_rope

# Marks this package apart from Hugging Face's `kernels` (same top-level name).
__rope_autotune__ = True

__all__ = [
    "DTYPE_NAMES",
    "Explanation",
    "Provider",
    "ProviderStatus",
    "RopeSelector",
    "RopeSpec",
    "RopeTableWarning",
    "cos_sin_cache",
    "get_provider",
    "list_providers",
    "mrope_stream_map",
    "nearest_spec_key",
    "parse_dtype",
    "provider_names",
    "register_provider",
    "select_rope",
    "unregister_provider",
]
