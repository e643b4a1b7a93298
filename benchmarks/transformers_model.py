"""A transformers model with and without the rope-autotune adapter: decode-step and prefill time.

A randomly initialized Llama-3-8B-shaped ``LlamaForCausalLM`` (hidden 4096, 32 query / 8 kv
heads of 128, Llama-3 RoPE scaling, bf16; ``--layers`` decoder layers, 4 by default) runs eagerly,
as transformers does. Measured, alternating rounds without and with the adapter
(``kernels.integrations.transformers.patch_model``), median over rounds of wall time per forward
(host launch cost included, the device drained at the round's ends):

- ``prefill``: one forward over ``--batch`` x ``--prefill-len`` tokens, no cache;
- ``decode``: one forward of ``--batch`` new tokens on a cache holding ``--context`` tokens (the
  cache is cropped back after each step, so every step sees the same length);
- ``rope call``: one layer's ``apply_rotary_pos_emb`` alone on that forward's ``cos``/``sin``.

The adapter's logits are compared with transformers' own (largest difference) first.
Writes ``transformers_model.csv`` and ``transformers_model.txt`` to ``$OUT`` (or ``--out``).

    PYTHONPATH=$PWD:/tmp/site python benchmarks/transformers_model.py --device cuda:0
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.integrations.transformers import patch_model

FIELDS = ["device", "transformers", "case", "tokens", "without_us", "with_us", "speedup", "note"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward")
    parser.add_argument("--prefill-len", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens when decoding")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant")
    parser.add_argument("--calls", type=int, default=10, help="forwards per round")
    parser.add_argument("--timing", default="eager", choices=("eager", "graph"), help="table")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="result folder ($OUT)")
    return parser.parse_args(argv)


def llama3_8b_shaped(layers: int, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def compare(model, fn: Callable[[], object], args, device) -> tuple[float, float]:
    """Median us per call without and with the adapter, rounds alternating between them."""
    times: dict[bool, list[float]] = {False: [], True: []}
    patch = None
    for _ in range(3):  # warm-up both: the selector, Triton's first compile, allocator pools
        fn()
        patch = patch_model(model, timing=args.timing)
        fn()
        patch.remove()
    for round_ in range(args.rounds):
        for patched in (False, True) if round_ % 2 == 0 else (True, False):
            patch = patch_model(model, timing=args.timing) if patched else None
            fn()  # a new patch builds its selectors on its first call: off the clock
            times[patched].append(per_call_us(fn, args.calls, device))
            if patch is not None:
                calls = patch.calls
                patch.remove()
                if calls == 0:
                    raise RuntimeError("the adapter ran no RoPE call: it is not active")
    return statistics.median(times[False]), statistics.median(times[True])


def time_rope_call(model, tokens_per_seq: int, args, device, dtype) -> tuple[float, float]:
    """One layer's ``apply_rotary_pos_emb`` on q/k ``[B, H, S, D]`` views, without and with."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    positions = torch.arange(tokens_per_seq, device=device).expand(args.batch, -1)
    hidden = torch.empty(1, dtype=dtype, device=device)
    shape = (args.batch, tokens_per_seq)
    q = torch.randn(*shape, config.num_attention_heads, head, device=device, dtype=dtype)
    k = torch.randn(*shape, config.num_key_value_heads, head, device=device, dtype=dtype)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds + 3):
        for patched in (False, True):
            patch = patch_model(model, timing=args.timing) if patched else None
            # The patch recognises only the cos/sin of a forward its hook saw.
            cos, sin = model.model.rotary_emb(hidden, positions)
            module.apply_rotary_pos_emb(q, k, cos, sin)  # builds the selector off the clock
            us = per_call_us(
                lambda cos=cos, sin=sin: module.apply_rotary_pos_emb(q, k, cos, sin),
                args.calls * 10,
                device,
            )
            if patch is not None:
                if patch.calls == 0:
                    raise RuntimeError("the adapter ran no RoPE call: it is not active")
                patch.remove()
            if round_ >= 3:  # the first rounds warm up
                times[patched].append(us)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> int:
    import transformers
    from transformers import DynamicCache

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = llama3_8b_shaped(args.layers, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    vocab = model.config.vocab_size
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    base = {"device": name, "transformers": transformers.__version__}
    # Generation computes the last position's logits only.
    params = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    # -- correctness: the same logits with and without the adapter ----------------------------
    ids = torch.randint(0, vocab, (args.batch, args.prefill_len), device=device, generator=gen)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        with patch_model(model, timing=args.timing) as patch:
            actual = model(input_ids=ids, use_cache=False).logits
            print(patch, "\n", *(s.explain(ids.numel()) for s in patch.selectors()), sep="")
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    note = f"logits max diff {diff:.3g} (largest logit magnitude {scale:.3g})"
    print(note)
    del expected, actual

    with torch.no_grad():
        # -- prefill --------------------------------------------------------------------------
        def prefill():
            model(input_ids=ids, use_cache=False, **last_only)

        without, with_ = compare(model, prefill, args, device)
        rows.append({**base, "case": "prefill", "tokens": ids.numel(), "note": note,
                     "without_us": f"{without:.1f}", "with_us": f"{with_:.1f}",
                     "speedup": f"{without / with_:.3f}"})  # fmt: skip

        # -- decode step on a cache of --context tokens ---------------------------------------
        context = torch.randint(0, vocab, (args.batch, args.context), device=device, generator=gen)
        cache = DynamicCache()
        model(input_ids=context, use_cache=True, **{cache_kw: cache})
        step_ids = torch.randint(0, vocab, (args.batch, 1), device=device, generator=gen)
        step_pos = torch.full((args.batch, 1), args.context, device=device)

        def decode():
            model(input_ids=step_ids, position_ids=step_pos, use_cache=True, **last_only,
                  **{cache_kw: cache})  # fmt: skip
            cache.crop(-1)  # drop the step's token (a negative count in transformers 4 and 5)

        without, with_ = compare(model, decode, args, device)
        rows.append({**base, "case": "decode step", "tokens": args.batch,
                     "note": f"context {args.context}", "without_us": f"{without:.1f}",
                     "with_us": f"{with_:.1f}", "speedup": f"{without / with_:.3f}"})  # fmt: skip

        # -- one layer's RoPE call alone ------------------------------------------------------
        for tokens_per_seq, case in ((1, "decode"), (args.prefill_len, "prefill")):
            without, with_ = time_rope_call(model, tokens_per_seq, args, device, dtype)
            rows.append(
                {
                    **base,
                    "case": f"rope call ({case})",
                    "note": "",
                    "tokens": args.batch * tokens_per_seq,
                    "without_us": f"{without:.2f}",
                    "with_us": f"{with_:.2f}",
                    "speedup": f"{without / with_:.3f}",
                }
            )
    write(rows, args)
    return 0


def write(rows: list[dict], args: argparse.Namespace) -> None:
    head = (
        f"{rows[0]['device']}, transformers {rows[0]['transformers']}, Llama-3-8B-shaped, "
        f"{args.layers} layers, {args.dtype}, eager, batch {args.batch}"
    )
    lines = [
        head,
        "| case | tokens | without adapter (us) | with adapter (us) | speedup | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['tokens']} | {r['without_us']} | {r['with_us']} | {r['speedup']} | "
        f"{r['note']} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "transformers_model.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        (folder / "transformers_model.txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
