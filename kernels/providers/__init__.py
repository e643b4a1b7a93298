"""RoPE providers behind one in-place contract, and their registry.

Importing this package registers every built-in provider. Adding one is a module that
subclasses :class:`Provider` (implementing :meth:`Provider.build`; a tunable one also its space
and model features) and calls :func:`register_provider`, plus an import below.

Also public here: the Triton kernel's tools that scripts and experiments use (its geometry,
launcher and default config).
"""

# Each module registers its provider on import; this order is the order of list_providers().
from . import (
    _flashinfer,  # noqa: F401
    _torch,  # noqa: F401
    _torch_compile,  # noqa: F401
    _triton,  # noqa: F401
    _triton_mrope,  # noqa: F401
    _vllm,  # noqa: F401
    _vllm_mrope,  # noqa: F401
)
from ._base import (
    MROPE,
    ROPE,
    Provider,
    ProviderStatus,
    Restriction,
    RopeFn,
    fallback_providers,
    get_provider,
    list_providers,
    provider_names,
    reference_provider,
    register_provider,
    unregister_provider,
)
from ._triton import TRITON, default_triton_config
from ._triton_geometry import TritonGeometry
from ._triton_launch import TritonLauncher, launch_hooks_active, launch_rope
from ._triton_mrope import TRITON_MROPE, MropeLauncher

__all__ = [
    "MROPE",
    "ROPE",
    "TRITON",
    "TRITON_MROPE",
    "MropeLauncher",
    "Provider",
    "ProviderStatus",
    "Restriction",
    "RopeFn",
    "TritonGeometry",
    "TritonLauncher",
    "default_triton_config",
    "fallback_providers",
    "get_provider",
    "launch_hooks_active",
    "launch_rope",
    "list_providers",
    "provider_names",
    "reference_provider",
    "register_provider",
    "unregister_provider",
]
