"""Glue that puts :func:`kernels.select_rope` inside other frameworks.

- :mod:`kernels.integrations.vllm`: a vLLM general plugin (entry point ``rope_autotune`` in the
  group ``vllm.general_plugins``) that overrides vLLM's RoPE layers out of tree.
- :mod:`kernels.integrations.transformers`: :func:`~kernels.integrations.transformers.patch_model`
  makes a loaded Hugging Face transformers model apply its RoPE through ``select_rope``.

Each submodule imports its framework when it is imported; this package imports neither.
"""

__all__: list[str] = []
