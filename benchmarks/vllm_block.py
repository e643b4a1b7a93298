"""RoPE as a vLLM user feels it: one attention block as vLLM's models build it, compiled, with
vLLM's default RoPE, vLLM's rotary op and the rope-autotune plugin's override.

The block (one sequence of ``T`` tokens; random weights with standard deviation
``1/sqrt(fan_in)`` so that activations stay near 1):

1. ``qkv = linear(hidden, W_qkv, b_qkv)`` (``torch.nn.functional.linear``), split into q, k, v,
   views of the fused ``qkv`` tensor (``qkv.split``, as vLLM's Llama, Qwen3 and Phi do);
2. Qwen3 only: QK-norm, RMSNorm over each head of q and k (vLLM's ``rms_norm`` math, written
   here in torch: vLLM's own layer dispatches through vLLM's IR ops);
3. ``q, k = rotary(positions, q, k)``, the layer vLLM's ``get_rope`` builds;
4. ``scaled_dot_product_attention`` (causal, GQA through ``enable_gqa``);
5. ``linear(attention, W_o, b_o)``.

It returns ``(out, q, k)``: the rotated q and k are buffers the attention reads anyway, and they
let the check see RoPE where the attention hides it (a lone token attends only to itself).
Positions are ``START_POSITION + arange(T)``, never position 0's identity rotation.

Variants, each layer built under vLLM's config with ``CompilationConfig(custom_ops=...)``:

- ``vllm-default``: ``custom_ops=["none"]``: the layer runs ``forward_native`` and Inductor
  compiles it with the block (vLLM's default with Inductor);
- ``vllm-op``: ``["none", "+rotary_embedding"]``: vLLM's ``forward_cuda``, its CUDA op;
- ``ours``: vLLM's default (``["none"]``) with the plugin registered
  (``kernels.integrations.vllm``), which turns the op on: the override's ``forward_cuda``, one
  opaque op inside the graph;
- ``no-rope``: the rotary step replaced by identity, so ``block - no-rope`` is what RoPE costs.

Each block is compiled with ``torch.compile(fullgraph=True, dynamic=False)``, a static graph
per token count (vLLM compiles one graph over a symbolic token count; static shapes are the
favourable case for Inductor's RoPE), Dynamo reset before each token count. Compiling happens
in a warm-up call, outside timing. Then every variant is checked against the block computed
in float64 (:func:`reference_block`: float64 weights and norms, ``kernels.testing``'s float64
RoPE on the layer's cache, causal attention in query chunks): each of ``out``, ``q`` and ``k``
by its largest error, at most twice ``vllm-default``'s (the criterion of FlashAttention's tests;
an element-wise bound does not fit here, since q and k carry the projection's rounding into
RoPE, whose output can be small where its inputs are not). A variant that fails prints FAIL
and is not timed (exit status 1).

Timing on CUDA: the compiled block replayed in a CUDA graph (``do_bench_cudagraph``, median of
its rounds, microseconds per block); inputs are built before. The weights are the same tensors
in every replay: a block's are 50 to 80 MB, at or above the L2's size, so replays read them
mostly from memory, as a model's layers do. On the CPU (``--device cpu``, a smoke run: build, check,
write the table) the time is host wall time, median of ``--repeats`` calls after a warm-up,
which says nothing about a GPU; vLLM's op does not exist there, so ``vllm-op`` is left out.

Writes ``vllm_block.csv`` and ``vllm_block.txt`` to ``$OUT`` (or ``--out``) after each row, and
prints the table.

    PYTHONPATH=$PWD:/tmp/site python benchmarks/vllm_block.py --device cuda:0
    python benchmarks/vllm_block.py --device cpu --tokens 1,16 --no-compile
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_layer import (  # the shared arguments; vLLM's config context (also where it finds no GPU)
    LLAMA3_8B_ROPE,
    add_shape_args,
    vllm_config,
)

from kernels import get_provider
from kernels.integrations import vllm as plugin
from kernels.table import library_versions
from kernels.testing import TOLERANCES, rope_reference

# The first token's position: nonzero, so that even one token is rotated.
START_POSITION = 1000
# Query rows per step of the float64 reference's attention: scores [heads, rows, T] stay small.
REFERENCE_ROWS = 256
# How far a variant's out, q and k may be from the float64 block: this many times
# vllm-default's largest error in each (the criterion of FlashAttention's tests).
ERROR_RATIO = 2.0


@dataclass(frozen=True)
class BlockModel:
    """One model's attention block: sizes, biases, QK-norm and ``get_rope``'s arguments."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_position: int
    rope_parameters: dict
    is_neox_style: bool = True
    qk_norm: bool = False
    bias: bool = False  # on both projections (Phi-2's qkv_proj and dense)
    norm_eps: float = 1e-6

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size


MODELS: dict[str, BlockModel] = {
    "llama3-8b": BlockModel(
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_size=128,
        max_position=131072,
        rope_parameters=LLAMA3_8B_ROPE,
    ),
    "qwen3-8b": BlockModel(
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_size=128,
        max_position=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        qk_norm=True,
    ),
    "phi-2": BlockModel(  # partial rotary: 32 of 80
        hidden_size=2560,
        num_heads=32,
        num_kv_heads=32,
        head_size=80,
        max_position=32768,  # 2048 in the model; positions here run past 17000
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.4,
        },
        bias=True,
    ),
}

VARIANTS = ("vllm-default", "vllm-op", "ours")
NO_ROPE = "no-rope"
CUSTOM_OPS = {
    "vllm-default": ["none"],
    "vllm-op": ["none", "+rotary_embedding"],
    "ours": ["none"],  # the plugin is on by default
}

FIELDS = [
    "device",
    "torch",
    "triton",
    "vllm",
    "mode",
    "model",
    "tokens",
    "check",
    "ours_choice",
    "vllm_default_us",
    "vllm_op_us",
    "ours_us",
    "no_rope_us",
    "rope_vllm_default_us",
    "rope_vllm_op_us",
    "rope_ours_us",
    "speedup_vs_vllm_default",
    "speedup_vs_vllm_op",
    "max_diff_vllm_default",
    "max_diff_vllm_op",
    "max_diff_ours",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser, MODELS)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile each block (--no-compile: eager, the CPU smoke run)",
    )
    parser.add_argument("--rep-ms", type=int, default=20, help="CUDA: ms of calls per graph")
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per block")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    return parser.parse_args(argv)


@contextmanager
def plugin_registered(registered: bool) -> Iterator[None]:
    """The plugin registered (or not) inside; its earlier state restored after."""
    before = bool(plugin.registered_overrides())
    (plugin.register if registered else plugin.unregister)()
    try:
        yield
    finally:
        (plugin.register if before else plugin.unregister)()


def build_rope(model: BlockModel, variant: str, dtype: torch.dtype, device: torch.device):
    """The rotary layer vLLM's ``get_rope`` builds for ``variant`` (see :data:`CUSTOM_OPS`).

    Raises:
        RuntimeError: the layer is not the class or path the variant names.
    """
    from vllm.model_executor.layers import rotary_embedding as rope_module

    # get_rope memoizes layers by their arguments, whatever the config they were built under.
    rope_module._ROPE_DICT.clear()
    with plugin_registered(variant == "ours"), vllm_config(CUSTOM_OPS[variant]):
        layer = rope_module.get_rope(
            model.head_size,
            model.max_position,
            model.is_neox_style,
            dict(model.rope_parameters),
            dtype,
        )
    rope_module._ROPE_DICT.clear()
    cls = type(layer)
    is_override = cls.__module__ == plugin.__name__
    path = getattr(layer._forward_method, "__func__", None)
    expected = cls.forward_native if variant == "vllm-default" else cls.forward_cuda
    if path is not expected or is_override != (variant == "ours"):
        raise RuntimeError(
            f"{variant}: expected {'the override' if variant == 'ours' else 'vLLM'}'s "
            f"{expected.__name__}, got {cls.__name__} running {layer._forward_method}"
        )
    return layer.to(device)


class RMSNorm(torch.nn.Module):
    """vLLM's ``rms_norm``: in float32, ``x * rsqrt(mean(x^2) + eps)``, back to the weight's
    dtype, times the weight, in ``x``'s dtype."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32.to(self.weight.dtype) * self.weight).to(x.dtype)


def make_weights(
    model: BlockModel, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random block weights, std ``1/sqrt(fan_in)`` (biases and norm weights near 0 and 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
        return (x * scale + shift).to(dtype)

    qkv_out = model.q_size + 2 * model.kv_size
    weights = {
        "qkv": randn(qkv_out, model.hidden_size, scale=model.hidden_size**-0.5),
        "o": randn(model.hidden_size, model.q_size, scale=model.q_size**-0.5),
        "qkv_bias": randn(qkv_out, scale=0.1) if model.bias else None,
        "o_bias": randn(model.hidden_size, scale=0.1) if model.bias else None,
        "q_norm": randn(model.head_size, scale=0.1, shift=1.0) if model.qk_norm else None,
        "k_norm": randn(model.head_size, scale=0.1, shift=1.0) if model.qk_norm else None,
    }
    return weights


class AttentionBlock(torch.nn.Module):
    """``forward(positions [T] int64, hidden [T, hidden_size]) -> (out [T, hidden_size],
    q [T, Hq*D], k [T, Hk*D])``, q and k as the attention reads them (after norm and RoPE);
    ``rotary`` None is the identity."""

    def __init__(self, model: BlockModel, weights: dict[str, torch.Tensor | None], rotary) -> None:
        super().__init__()
        self.model = model
        self.qkv_weight, self.qkv_bias = weights["qkv"], weights["qkv_bias"]
        self.o_weight, self.o_bias = weights["o"], weights["o_bias"]
        self.q_norm = self.k_norm = None
        if model.qk_norm:
            self.q_norm = RMSNorm(weights["q_norm"], model.norm_eps)
            self.k_norm = RMSNorm(weights["k_norm"], model.norm_eps)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor):
        m = self.model
        tokens = hidden.shape[0]
        qkv = torch.nn.functional.linear(hidden, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([m.q_size, m.kv_size, m.kv_size], dim=-1)
        if self.q_norm is not None:  # per head, as vLLM's Qwen3Attention
            q = self.q_norm(q.view(tokens, m.num_heads, m.head_size)).view(q.shape)
            k = self.k_norm(k.view(tokens, m.num_kv_heads, m.head_size)).view(k.shape)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [T, n*D] -> [1, n, T, D]
            return x.view(tokens, n, m.head_size).transpose(0, 1).unsqueeze(0)

        attn = torch.nn.functional.scaled_dot_product_attention(
            heads(q, m.num_heads),
            heads(k, m.num_kv_heads),
            heads(v, m.num_kv_heads),
            is_causal=True,
            scale=m.head_size**-0.5,
            enable_gqa=m.num_heads != m.num_kv_heads,
        )
        attn = attn.squeeze(0).transpose(0, 1).reshape(tokens, m.q_size)
        return torch.nn.functional.linear(attn, self.o_weight, self.o_bias), q, k


def make_inputs(
    model: BlockModel, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions`` (``START_POSITION + arange(T)``, int64) and ``hidden`` (``[T, hidden]``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(
        tokens, model.hidden_size, generator=gen, device=device, dtype=torch.float32
    ).to(dtype)
    positions = torch.arange(tokens, device=device, dtype=torch.int64) + START_POSITION
    return positions, hidden


def reference_block(
    block: AttentionBlock, positions: torch.Tensor, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block``'s ``(out, q, k)`` computed in float64, eagerly, without vLLM's or our RoPE code:
    the projections and QK-norm in float64, ``kernels.testing.rope_reference`` on the rotary
    layer's ``cos_sin_cache`` (the one input every variant shares), causal softmax attention
    :data:`REFERENCE_ROWS` query rows at a time. q and k are ``[T, H*D]``."""
    m, tokens = block.model, hidden.shape[0]

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.double()

    qkv = torch.nn.functional.linear(hidden.double(), f64(block.qkv_weight), f64(block.qkv_bias))
    q, k, v = qkv.split([m.q_size, m.kv_size, m.kv_size], dim=-1)
    if m.qk_norm:

        def norm(x: torch.Tensor, layer: RMSNorm, heads: int) -> torch.Tensor:
            x = x.reshape(tokens, heads, m.head_size)
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + layer.eps)
            return (x * layer.weight.double()).reshape(tokens, -1)

        q, k = norm(q, block.q_norm, m.num_heads), norm(k, block.k_norm, m.num_kv_heads)
    # rope_reference takes float32 q/k (exact to 2^-24) and rotates in float64.
    q, k = rope_reference(
        positions, q.float(), k.float(), block.rotary.cos_sin_cache.float(),
        m.head_size, m.is_neox_style,
    )  # fmt: skip
    group = m.num_heads // m.num_kv_heads
    keys = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, T, D]
    values = v.reshape(tokens, m.num_kv_heads, m.head_size)
    values = values.repeat_interleave(group, dim=1).transpose(0, 1)
    queries = q.transpose(0, 1)  # [Hq, T, D]
    attn = torch.empty_like(queries)
    for start in range(0, tokens, REFERENCE_ROWS):
        stop = min(start + REFERENCE_ROWS, tokens)
        scores = queries[:, start:stop] @ keys[:, :stop].transpose(1, 2) * m.head_size**-0.5
        rows = torch.arange(start, stop, device=hidden.device)[:, None]
        cols = torch.arange(stop, device=hidden.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
        attn[:, start:stop] = scores.softmax(dim=-1) @ values[:, :stop]
    attn = attn.transpose(0, 1).reshape(tokens, m.q_size)
    out = torch.nn.functional.linear(attn, f64(block.o_weight), f64(block.o_bias))
    return out, q.reshape(tokens, -1), k.reshape(tokens, -1)


def errors(reference: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> tuple[float, ...]:
    """The largest ``|got - reference|`` of each of ``(out, q, k)`` (inf where ``got`` has NaN)."""
    return tuple(
        (have.double().reshape(want.shape) - want.double()).abs().nan_to_num(float("inf"))
        .max().item()
        for want, have in zip(reference, got, strict=True)
    )  # fmt: skip


def compare(
    reference: tuple[torch.Tensor, ...],
    got: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    baseline: tuple[float, ...] | None = None,
) -> tuple[float, str | None]:
    """``got``'s largest error in ``out`` against the float64 ``reference``, and why ``got`` is
    off: None when each of ``(out, q, k)`` is within :data:`ERROR_RATIO` times ``baseline``'s
    largest error of it (vllm-default's :func:`errors`), a bound never below the dtype's
    ``rtol`` times the reference's rms."""
    rtol = TOLERANCES[dtype][1]
    got_errors = errors(reference, got)
    baseline = baseline or (0.0,) * len(reference)
    reason = None
    for name, want, err, base in zip(
        ("out", "q", "k"), reference, got_errors, baseline, strict=True
    ):
        bound = max(ERROR_RATIO * base, rtol * want.double().pow(2).mean().sqrt().item())
        if reason is None and not err <= bound:
            reason = f"{name}: largest difference {err:.3g} over the bound {bound:.3g}"
    return got_errors[0], reason


def time_block(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> float:
    """Microseconds per call: CUDA graph replay (median) on CUDA, else host wall time (median
    of ``args.repeats`` calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        with torch.cuda.device(device):
            return do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_blocks(
    model: BlockModel, variants: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, AttentionBlock]:
    """One block per variant (and :data:`NO_ROPE`), all on the same weight tensors."""
    weights = make_weights(model, dtype, device)
    blocks = {NO_ROPE: AttentionBlock(model, weights, None)}
    for variant in variants:
        blocks[variant] = AttentionBlock(model, weights, build_rope(model, variant, dtype, device))
    return blocks


def run_model(
    name: str, args: argparse.Namespace, device: torch.device, header: dict, on_row
) -> bool:
    """Check and time ``name``'s block at each token count; ``on_row(row)`` per token count.
    Returns whether every check passed."""
    model = MODELS[name]
    dtype = getattr(torch, args.dtype)
    op_reason = get_provider("vllm").unavailable_reason(device)  # loads vLLM's op library
    variants = [v for v in VARIANTS if v != "vllm-op" or op_reason is None]
    if op_reason is not None:
        print(f"{name}: vllm-op left out: {op_reason}", file=sys.stderr)
    else:  # imported inside forward_cuda: done here, before Dynamo traces that
        import vllm._custom_ops  # noqa: F401
    blocks = build_blocks(model, variants, dtype, device)
    ok = True
    for tokens in [int(t) for t in args.tokens.split(",")]:
        start = time.perf_counter()
        torch._dynamo.reset()  # a fresh static graph per block and token count
        positions, hidden = make_inputs(model, tokens, dtype, device)
        calls: dict[str, Callable[[], object]] = {}
        outputs: dict[str, tuple] = {}
        notes: dict[str, str] = {}
        for variant, block in blocks.items():
            fn = torch.compile(block, fullgraph=True, dynamic=False) if args.compile else block
            try:
                with torch.no_grad():
                    outputs[variant] = tuple(x.clone() for x in fn(positions, hidden))
                sync(device)
            except Exception as exc:  # a variant that cannot compile or run: reported, not timed
                notes[variant] = f"ERROR {type(exc).__name__}"
                print(f"ERROR {name} {tokens} {variant}: {exc}", file=sys.stderr)
                continue
            calls[variant] = lambda fn=fn, p=positions, h=hidden: fn(p, h)
        row = dict(header, model=name, tokens=tokens)
        row["mode"] = ("compiled" if args.compile else "eager") + (
            "+cuda-graph" if device.type == "cuda" else "+cpu-wall"
        )
        with torch.no_grad():
            reference = reference_block(blocks["vllm-default"], positions, hidden)
        baseline = None  # vllm-default's errors: the bound of the others
        if "vllm-default" in outputs:
            baseline = errors(reference, outputs["vllm-default"])
            row["max_diff_vllm_default"] = f"{baseline[0]:.3g}"
        for variant in ("vllm-op", "ours"):
            if variant not in outputs or baseline is None:
                notes.setdefault(
                    variant, "no reference" if variant in blocks else f"n/a ({op_reason})"
                )
                calls.pop(variant, None)
                continue
            diff, reason = compare(reference, outputs[variant], dtype, baseline)
            row[f"max_diff_{variant.replace('-', '_')}"] = f"{diff:.3g}"
            if reason is not None:
                print(f"FAIL {name} {tokens} {variant}: {reason}", file=sys.stderr)
                notes[variant] = "FAIL"
                calls.pop(variant)
        outputs.clear()
        if "ours" in blocks:
            selector = plugin.selector_for(
                blocks["ours"].rotary, model.num_heads, model.num_kv_heads, dtype, device
            )
            row["ours_choice"] = selector.explain(tokens).provider if selector else "vllm op"
        times: dict[str, float] = {}
        for variant, call in calls.items():
            try:
                with torch.no_grad():  # as in the warm-up: grad mode is one of Dynamo's guards
                    times[variant] = time_block(call, device, args)
            except Exception as exc:  # e.g. a capture that fails: reported, the rest timed
                notes[variant] = f"timing ERROR {type(exc).__name__}"
                print(f"ERROR {name} {tokens} {variant} timing: {exc}", file=sys.stderr)
        ok &= not any(n.startswith(("FAIL", "ERROR", "timing")) for n in notes.values())
        row["check"] = "; ".join(f"{v} {n}" for v, n in notes.items()) or "ok"
        fill_times(row, times)
        on_row(row)
        print(
            f"{name} {tokens}: "
            + ", ".join(f"{v} {t:.1f} us" for v, t in times.items())
            + f" ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return ok


def fill_times(row: dict, times: dict[str, float]) -> None:
    """Block times, RoPE's share (block minus ``no-rope``) and ours' speed-ups into ``row``."""
    base = times.get(NO_ROPE)
    for variant in VARIANTS:
        key = variant.replace("-", "_")
        t = times.get(variant)
        row[f"{key}_us"] = "-" if t is None else f"{t:.2f}"
        row[f"rope_{key}_us"] = "-" if t is None or base is None else f"{t - base:.2f}"
    row["no_rope_us"] = "-" if base is None else f"{base:.2f}"
    ours = times.get("ours")
    for variant in ("vllm-default", "vllm-op"):
        other = times.get(variant)
        speedup = "-" if ours is None or other is None else f"{other / ours:.3f}"
        row[f"speedup_vs_{variant.replace('-', '_')}"] = speedup


def header_fields(device: torch.device) -> dict:
    versions = library_versions()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {
        "device": name,
        "torch": versions["torch"],
        "triton": versions["triton"],
        "vllm": versions["vllm"],
    }


def format_table(rows: list[dict], device: torch.device) -> str:
    """The header lines (device, library versions, how it was timed) and a markdown table."""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items() if v is not None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    mode = rows[0]["mode"] if rows else "-"
    lines = [
        f"# {name}; {versions}",
        f"# attention block, {mode}; us per block; RoPE = block - no-rope; x = ours' speed-up;"
        " out error: largest against the float64 block",
        "| model | tokens | check | vLLM default | vLLM op | ours | no RoPE | RoPE default | "
        "RoPE op | RoPE ours | x vs default | x vs op | ours' choice | out error default/op/ours |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['check']} | {r['vllm_default_us']} | "
            f"{r['vllm_op_us']} | {r['ours_us']} | {r['no_rope_us']} | "
            f"{r['rope_vllm_default_us']} | {r['rope_vllm_op_us']} | {r['rope_ours_us']} | "
            f"{r['speedup_vs_vllm_default']} | {r['speedup_vs_vllm_op']} | "
            f"{r.get('ours_choice', '-')} | "
            + "/".join(r.get(f"max_diff_{v}", "-") for v in ("vllm_default", "vllm_op", "ours"))
            + " |"
        )
    return "\n".join(lines)


def write(rows: list[dict], device: torch.device, out: str | None) -> str:
    """Write ``vllm_block.csv`` and ``vllm_block.txt`` into ``out`` (if given); return the text."""
    text = format_table(rows, device)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vllm_block.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, restval="-")
            writer.writeheader()
            writer.writerows(rows)
        (folder / "vllm_block.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown models {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    header = header_fields(device)
    rows: list[dict] = []

    def on_row(row: dict) -> None:  # written as it comes: a run cut short keeps its rows
        rows.append(row)
        write(rows, device, args.out)

    ok = True
    for name in names:
        ok &= run_model(name, args, device, header, on_row)
    print(write(rows, device, args.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
