"""rope-autotune's runtime: RoPE providers, the tuning-table reader and the selector.

Stays light: imports torch and triton, never optuna.
"""

# Tells this package apart from Hugging Face's kernel hub, which installs the same name.
__rope_autotune__ = True

from ._spec import DTYPE_NAMES, RopeSpec, parse_dtype
from .providers import (
    Provider,
    ProviderStatus,
    get_provider,
    list_providers,
    provider_names,
    register_provider,
)
from .reference import TOLERANCES, assert_rope_close, cos_sin_cache, rope_reference
from .selector import Explanation, RopeSelector, RopeTableWarning, select_rope

__all__ = [
    "DTYPE_NAMES",
    "TOLERANCES",
    "Explanation",
    "Provider",
    "ProviderStatus",
    "RopeSelector",
    "RopeSpec",
    "RopeTableWarning",
    "assert_rope_close",
    "cos_sin_cache",
    "get_provider",
    "list_providers",
    "parse_dtype",
    "provider_names",
    "register_provider",
    "rope_reference",
    "select_rope",
]
