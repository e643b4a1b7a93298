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
- ``ours``: the same switch with the plugin registered (``kernels.integrations.vllm``): the
  override's ``forward_cuda``, one opaque op inside the graph;
- ``no-rope``: the rotary step replaced by identity, so ``block - no-rope`` is what RoPE costs.

Each block is compiled with ``torch.compile(fullgraph=True, dynamic=False)``, a static graph
per token count (vLLM compiles one graph over a symbolic token count; static shapes are the
favourable case for Inductor's RoPE), Dynamo reset before each token count. Compiling happens
in a warm-up call, outside timing. Then ``vllm-op`` and ``ours`` are checked against
``vllm-default``: every element of ``out``, ``q`` and ``k`` within ``rtol * (|ref| + rms(ref))``,
``rtol`` the dtype's (``kernels.testing.TOLERANCES``); a variant that fails prints FAIL and is
not timed (exit status 1).

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
from kernels.testing import TOLERANCES

# The first token's position: nonzero, so that even one token is rotated.
START_POSITION = 1000


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
    "ours": ["none", "+rotary_embedding"],
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


def compare(
    reference: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> tuple[float, str | None]:
    """The largest difference over ``(out, q, k)``, and why ``got`` is off (None when every
    element is within ``rtol * (|ref| + rms(ref))``, ``rtol`` the dtype's; NaN never is)."""
    rtol = TOLERANCES[dtype][1]
    largest, reason = 0.0, None
    for name, want, have in zip(("out", "q", "k"), reference, got, strict=True):
        want, have = want.float(), have.float().reshape(want.shape)
        err = (have - want).abs()
        bound = rtol * (want.abs() + want.pow(2).mean().sqrt())
        bad = ~(err <= bound)
        largest = max(largest, err.nan_to_num(float("inf")).max().item())
        if reason is None and bool(bad.any()):
            reason = (
                f"{name}: {int(bad.sum())} of {bad.numel()} elements off "
                f"(largest difference {err.nan_to_num(float('inf')).max().item():.3g})"
            )
    return largest, reason


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
        reference = outputs.get("vllm-default")
        for variant in ("vllm-op", "ours"):
            if variant not in outputs or reference is None:
                notes.setdefault(
                    variant, "no reference" if variant in blocks else f"n/a ({op_reason})"
                )
                calls.pop(variant, None)
                continue
            diff, reason = compare(reference, outputs[variant], dtype)
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
        f"# attention block, {mode}; us per block; RoPE = block - no-rope; x = ours' speed-up",
        "| model | tokens | check | vLLM default | vLLM op | ours | no RoPE | RoPE default | "
        "RoPE op | RoPE ours | x vs default | x vs op | ours' choice |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['check']} | {r['vllm_default_us']} | "
            f"{r['vllm_op_us']} | {r['ours_us']} | {r['no_rope_us']} | "
            f"{r['rope_vllm_default_us']} | {r['rope_vllm_op_us']} | {r['rope_ours_us']} | "
            f"{r['speedup_vs_vllm_default']} | {r['speedup_vs_vllm_op']} | "
            f"{r.get('ours_choice', '-')} |"
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
