"""``python -m autotune.bench``: RoPE providers compared on one device, done right.

The interface and default grid of vLLM's ``benchmarks/kernels/benchmark_rope.py``: batch
size 1, 4, 16, 64 x sequence length 64, 128, 256, 512 x 32 and 48 heads, head 128, rotary 32,
NeoX style::

    python -m autotune.bench --head-size 128 --rotary-dim 32 --is-neox-style \\
        --device cuda:0 --save-path ./rope_results/

Providers: ``torch``, ``torch_compile``, ``triton`` (its default config for the token count),
``triton_tuned`` (the config the tuning table records for the spec and token bucket, when the
table's winner there is Triton), ``flashinfer``, ``vllm``, and ``select_rope`` (the selector's
callable itself). Those unavailable on the device, or not supporting a spec, are listed with
the reason and skipped. Every provider is checked against the float64 reference on fresh inputs
before it is timed, at every spec and token count; one that fails is reported, not timed.

Each call gets ``T = batch_size * seq_len`` tokens: positions ``[T]`` int64, q and k
``[T, H*D]`` strided column views of one fused ``[T, (Hq + 2*Hk)*D]`` qkv tensor, a float32
``[8192, rotary_dim]`` cos/sin cache. Timing is CUDA graph replay by default (``--timing
eager``: back-to-back calls, host launch cost included), rotating input sets larger than the L2,
median and p20/p80 over rounds (:func:`kernels.measure.time_rope`). A token count reached by
several (batch, sequence) pairs is measured once and reported on each pair's row.

The floor of a call is :meth:`kernels.RopeSpec.bytes_moved` (rotated part of every q and k head
read and written once, one cos/sin row and one position per token) over the measured copy
bandwidth of the device; ``pct_floor`` is floor time over the median, ``tbps`` bytes moved over
the median.

Outputs under ``--save-path``:

* ``rope_benchmark.csv``, one row per spec, batch size, sequence length and provider, columns
  :data:`CSV_COLUMNS`: ``device, torch, triton, cuda, flashinfer, vllm`` (versions; empty when
  not installed), ``head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype,
  batch_size, seq_len, num_tokens, provider, config`` (JSON; for ``select_rope`` the provider it
  dispatched to, then its config), ``p20_us, p50_us, p80_us, tbps, pct_floor``.
* ``rope_q<Hq>_kv<Hk>_d<D>_r<R>_<neox|gptj>_<dtype>.png`` per spec: median latency against
  tokens per provider (log-log, p20-p80 bars, the floor dashed) and % of the floor against
  tokens.

From Python::

    from autotune.bench import run_bench, write_csv
    from kernels import RopeSpec
    import torch

    spec = RopeSpec(128, 32, 32, 32, is_neox=True, dtype=torch.bfloat16)
    result = run_bench([spec], [1, 4], [512], "cuda:0", providers=["vllm", "select_rope"])
    write_csv(result.rows, "rope_results/rope_benchmark.csv")
"""

from __future__ import annotations

# Without the tune extra, or with another package named kernels, the imports fail: the package
# still imports, so that ``python -m autotune.bench`` can say what to install, and each name
# raises the reason when used.
try:
    from ._cli import build_parser, main, specs_from_args
    from ._models import model_specs
    from ._plots import plot_results
    from ._report import CSV_NAME, format_skipped, format_table, write_csv
    from ._run import (
        CSV_COLUMNS,
        PSEUDO_PROVIDERS,
        BenchResult,
        Skipped,
        all_provider_names,
        measure_copy_bandwidth,
        run_bench,
    )
except ImportError as _import_error:
    _IMPORT_ERROR: ImportError | None = _import_error
else:
    _IMPORT_ERROR = None


def __getattr__(name: str):
    if _IMPORT_ERROR is not None and name in __all__:
        from .._environment import environment_problem

        raise ImportError(f"autotune.bench.{name}: {environment_problem() or _IMPORT_ERROR}") from (
            _IMPORT_ERROR
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CSV_COLUMNS",
    "CSV_NAME",
    "PSEUDO_PROVIDERS",
    "BenchResult",
    "Skipped",
    "all_provider_names",
    "build_parser",
    "format_skipped",
    "format_table",
    "main",
    "measure_copy_bandwidth",
    "model_specs",
    "plot_results",
    "run_bench",
    "specs_from_args",
    "write_csv",
]
