"""Compiling ahead is the runtime's: :mod:`kernels.compile_ahead` (re-exported here for scripts
written against this module's former home)."""

from kernels.compile_ahead import compile_ahead, default_compile_threads

__all__ = ["compile_ahead", "default_compile_threads"]
