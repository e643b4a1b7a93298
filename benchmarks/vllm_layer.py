"""vLLM's own RoPE layers against the same layers overridden by the rope-autotune plugin.

For each model config vLLM's ``get_rope`` builds the layer twice, once as vLLM's own class and
once with the plugin registered (the override), with identical caches. Per token count, on the
same inputs (q and k column slices of a fused qkv tensor, random positions; ``[3, T]`` for the
multimodal models' ``MRotaryEmbedding``):

- outputs: the override against vLLM's ``forward_cuda`` (bit-identical or the largest
  difference) and both against a float64 reference on the layer's cache (within the dtype's
  tolerance or FAIL);
- times of ``forward_cuda`` (vLLM's CUDA op vs the override's selector): CUDA graph replay and
  eager back-to-back calls (median, microseconds; ``kernels.measure.time_rope``);
- under ``torch.compile`` (Inductor, ``fullgraph=True``): vLLM's ``forward_native`` (what vLLM
  compiles when custom ops are off, its default with Inductor) against the override (custom op
  ``+rotary_embedding``), graph replay, and the number of graphs Dynamo has compiled for the
  override so far for this model (``fullgraph=True``: a graph break would raise; the first token
  count compiles a static graph, the second a dynamic one that serves the rest).

Writes ``vllm_layer.csv`` and ``vllm_layer.txt`` to ``$OUT`` (or ``--out``) and prints the table.

    PYTHONPATH=$PWD:/tmp/site python benchmarks/vllm_layer.py --device cuda:0
    python benchmarks/vllm_layer.py --models llama3-8b --tokens 1,256 --no-compiled
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kernels import RopeSpec, get_provider
from kernels.integrations.vllm import selector_for
from kernels.measure import make_inputs, time_rope
from kernels.table import library_versions
from kernels.testing import assert_rope_close, rope_reference

# Llama-3-8B's rope_parameters (its config.json), shared with vllm_block.py.
LLAMA3_8B_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# name -> (get_rope arguments, query heads, kv heads)
MODELS: dict[str, tuple[dict, int, int]] = {
    "llama3-8b": (
        {
            "head_size": 128,
            "max_position": 131072,
            "is_neox_style": True,
            "rope_parameters": LLAMA3_8B_ROPE,
        },
        32,
        8,
    ),
    "qwen3-8b-yarn": (
        {
            "head_size": 128,
            "max_position": 131072,
            "is_neox_style": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
        32,
        8,
    ),
    "qwen2.5-7b": (
        {
            "head_size": 128,
            "max_position": 32768,
            "is_neox_style": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        28,
        4,
    ),
    "phi-2": (  # partial rotary: 32 of 80
        {
            "head_size": 80,
            "max_position": 8192,  # 2048 in the model; the timing draws positions up to 8192
            "is_neox_style": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.4,
            },
        },
        32,
        32,
    ),
    "gpt-j-6b": (  # partial rotary (64 of 256), GPT-J style
        {
            "head_size": 256,
            "max_position": 8192,
            "is_neox_style": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            },
        },
        16,
        16,
    ),
    # Multimodal RoPE (MRotaryEmbedding): positions [3, T], the sections chunked or interleaved.
    "qwen2.5-vl-7b": (
        {
            "head_size": 128,
            "max_position": 128000,
            "is_neox_style": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        28,
        4,
    ),
    "qwen3-vl-8b": (
        {
            "head_size": 128,
            "max_position": 262144,
            "is_neox_style": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        32,
        8,
    ),
    "qwen2-vl-2b": (
        {
            "head_size": 128,
            "max_position": 32768,
            "is_neox_style": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        12,
        2,
    ),
}

FIELDS = [
    "device",
    "vllm",
    "model",
    "layer_class",
    "spec",
    "tokens",
    "provider",
    "bit_identical",
    "max_abs_diff",
    "within_tolerance",
    "vllm_graph_us",
    "ours_graph_us",
    "speedup_graph",
    "vllm_eager_us",
    "ours_eager_us",
    "speedup_eager",
    "native_compiled_us",
    "ours_compiled_us",
    "speedup_compiled",
    "ours_compiled_graphs",
]


def add_shape_args(parser: argparse.ArgumentParser, models) -> None:
    """The arguments the vLLM benchmarks share: device, models (names of ``models``), token
    counts and dtype."""
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--models", default=",".join(models), help="comma list: " + ", ".join(models)
    )
    parser.add_argument("--tokens", default="1,16,256,4096,16384", help="comma list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser, MODELS)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per measurement")
    parser.add_argument(
        "--compiled", action=argparse.BooleanOptionalAction, default=True, help="torch.compile rows"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    return parser.parse_args(argv)


@contextmanager
def vllm_config(custom_ops: list[str]):
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config

    try:
        device_config = DeviceConfig(device="cuda")
    except Exception:  # vLLM finds no CUDA platform when only its Python layers are installed
        device_config = DeviceConfig(device="cpu")
    config = VllmConfig(
        device_config=device_config,
        compilation_config=CompilationConfig(custom_ops=custom_ops),
    )
    with set_current_vllm_config(config):
        yield


def build_layer(name: str, dtype: torch.dtype, device: torch.device, overridden: bool):
    from vllm.model_executor.layers import rotary_embedding as rope_module

    from kernels.integrations import vllm as plugin

    kwargs, _, _ = MODELS[name]
    (plugin.register if overridden else plugin.unregister)()
    rope_module._ROPE_DICT.clear()
    with vllm_config(["all"]):
        layer = rope_module.get_rope(
            kwargs["head_size"],
            kwargs["max_position"],
            kwargs["is_neox_style"],
            dict(kwargs["rope_parameters"]),
            dtype,
        )
    rope_module._ROPE_DICT.clear()
    is_override = type(layer).__module__ == plugin.__name__
    if is_override != overridden:
        raise RuntimeError(f"{name}: expected overridden={overridden}, got {type(layer)}")
    return layer.to(device)


def in_tree_class(layer) -> type:
    from vllm.model_executor.layers import rotary_embedding as rope_module

    return getattr(rope_module, type(layer).__name__.removeprefix("RopeAutotune"))


def compare_outputs(vllm_layer, ours, spec: RopeSpec, tokens: int, device) -> dict:
    gen = torch.Generator(device=device)
    gen.manual_seed(tokens)
    inputs = make_inputs(spec, tokens, device, generator=gen)
    positions, query, key = inputs.positions, inputs.query, inputs.key
    positions = positions % ours.cos_sin_cache.shape[0]
    # vLLM's mRoPE path rotates contiguous copies of strided views and returns those, as its
    # models use them: compare what each forward_cuda returns.
    vllm_q, vllm_k = in_tree_class(vllm_layer).forward_cuda(
        vllm_layer, positions, query.clone(), key.clone()
    )
    ours_q, ours_k = ours.forward_cuda(positions, query.clone(), key.clone())
    cache = ours.cos_sin_cache  # in the query's dtype after forward_cuda, as vLLM converts it
    ref_q, ref_k = rope_reference(
        positions, query, key, cache, spec.head_size, spec.is_neox,
        mrope_section=spec.mrope_section, mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip
    within = True
    for got, want, label in ((ours_q, ref_q, "query"), (ours_k, ref_k, "key")):
        try:
            assert_rope_close(got, want, spec.dtype, label)
        except AssertionError as exc:
            print(f"FAIL {spec.key} {tokens} tokens: {exc}", file=sys.stderr)
            within = False
    diff = max(
        (ours_q.float() - vllm_q.float()).abs().max().item(),
        (ours_k.float() - vllm_k.float()).abs().max().item(),
    )
    identical = torch.equal(ours_q, vllm_q) and torch.equal(ours_k, vllm_k)
    return {"bit_identical": identical, "max_abs_diff": f"{diff:.3g}", "within_tolerance": within}


class GraphCounter:
    """An Inductor backend that counts the graphs Dynamo hands it."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor import compile_fx

        self.graphs += 1
        return compile_fx.compile_fx(gm, example_inputs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reason = get_provider("vllm").unavailable_reason(device)  # loads vLLM's op library
    if reason is not None:
        print(f"vLLM's CUDA op is unavailable: {reason}", file=sys.stderr)
        return 2
    tokens_list = [int(t) for t in args.tokens.split(",")]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    vllm_version = library_versions().get("vllm")
    rows, failed = [], False
    for name in args.models.split(","):
        _, num_heads, num_kv_heads = MODELS[name]
        vllm_layer = build_layer(name, dtype, device, overridden=False)
        ours = build_layer(name, dtype, device, overridden=True)
        section = getattr(ours, "mrope_section", None)  # MRotaryEmbedding's
        spec = RopeSpec(
            ours.head_size, ours.rotary_dim, num_heads, num_kv_heads, ours.is_neox_style, dtype,
            mrope_section=None if section is None else tuple(section),
            mrope_interleaved=bool(getattr(ours, "mrope_interleaved", False)),
        )  # fmt: skip
        vllm_fn = in_tree_class(vllm_layer).forward_cuda

        def run_vllm(p, q, k, c, layer=vllm_layer, fn=vllm_fn):
            fn(layer, p, q, k)

        def run_ours(p, q, k, c, layer=ours):
            layer.forward_cuda(p, q, k)

        compiled = {}
        if args.compiled:
            counter = GraphCounter()
            q_width = num_heads * ours.head_size
            k_width = num_kv_heads * ours.head_size

            def on_fused(forward, q_width=q_width, k_width=k_width, **options):
                """Compiled over the fused qkv tensor, split inside the graph as vLLM's models
                do (q and k as two aliasing graph inputs is not what a model compiles)."""

                def split(p, qkv):
                    return forward(p, qkv[:, :q_width], qkv[:, q_width : q_width + k_width])

                # One code object serves every model here: start each from Dynamo's clean slate
                # so that recompiles of earlier models do not count against this one.
                torch._dynamo.reset()
                inner = torch.compile(split, fullgraph=True, **options)
                return lambda p, q, k, c: inner(p, q._base)

            compiled["native"] = on_fused(vllm_layer.forward_native)
            compiled["ours"] = on_fused(ours.forward_cuda, backend=counter)
        for tokens in tokens_list:
            start = time.perf_counter()
            row = {
                "device": device_name,
                "vllm": vllm_version,
                "model": name,
                "layer_class": in_tree_class(ours).__name__,
                "spec": spec.key,
                "tokens": tokens,
            }
            selector = selector_for(ours, num_heads, num_kv_heads, dtype, device)
            row["provider"] = selector.explain(tokens).provider if selector else "vllm (fallback)"
            row.update(compare_outputs(vllm_layer, ours, spec, tokens, device))
            failed |= not row["within_tolerance"]
            timing = {"repeats": args.repeats}
            for mode in ("graph", "eager"):
                v = time_rope(run_vllm, spec, tokens, device, mode=mode, **timing).median_us
                o = time_rope(run_ours, spec, tokens, device, mode=mode, **timing).median_us
                row[f"vllm_{mode}_us"], row[f"ours_{mode}_us"] = f"{v:.2f}", f"{o:.2f}"
                row[f"speedup_{mode}"] = f"{v / o:.2f}"
            if compiled:
                n = time_rope(compiled["native"], spec, tokens, device, **timing).median_us
                o = time_rope(compiled["ours"], spec, tokens, device, **timing).median_us
                row["native_compiled_us"], row["ours_compiled_us"] = f"{n:.2f}", f"{o:.2f}"
                row["speedup_compiled"] = f"{n / o:.2f}"
                row["ours_compiled_graphs"] = counter.graphs
            rows.append(row)
            print(
                f"{name} {tokens}: {row['provider']}, graph {row['vllm_graph_us']} -> "
                f"{row['ours_graph_us']} us ({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    write(rows, args.out)
    return 1 if failed else 0


def write(rows: list[dict], out: str | None) -> None:
    header = (
        "| model | class | tokens | choice | equal to vLLM | vLLM graph us | ours | x | "
        "vLLM eager us | ours | x | native compiled us | ours compiled | x | graphs |"
    )
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        equal = "bit-identical" if r["bit_identical"] else f"max diff {r['max_abs_diff']}"
        if not r["within_tolerance"]:
            equal += " FAIL"
        lines.append(
            f"| {r['model']} | {r['layer_class']} | {r['tokens']} | {r['provider']} | {equal} | "
            f"{r['vllm_graph_us']} | {r['ours_graph_us']} | {r['speedup_graph']} | "
            f"{r['vllm_eager_us']} | {r['ours_eager_us']} | {r['speedup_eager']} | "
            f"{r.get('native_compiled_us', '-')} | {r.get('ours_compiled_us', '-')} | "
            f"{r.get('speedup_compiled', '-')} | {r.get('ours_compiled_graphs', '-')} |"
        )
    text = "\n".join(lines)
    print(f"{rows[0]['device'] if rows else ''}, vLLM {rows[0]['vllm'] if rows else ''}")
    print(text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vllm_layer.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        (folder / "vllm_layer.txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
