"""select_rope inside torch.compile: one opaque custom op, no graph break, no recompile per token
count, results equal to eager. Compiles cost seconds on the CPU: the one compiled function here
runs under ``-m slow``; the opcheck test only captures a graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from conftest import entry, make_table, put

from kernels import RopeSpec, cos_sin_cache, select_rope

SPEC = RopeSpec(
    head_size=64, rotary_dim=32, num_heads=4, num_kv_heads=2, is_neox=False, dtype=torch.float32
)
TRITON_CONFIG = {"block_t": 4, "block_h": 2, "head_split": 1, "num_warps": 1, "num_stages": 1}


@pytest.fixture
def rope(dirs):
    """A selector whose table sends small counts to triton and larger ones to torch."""
    table = make_table({SPEC.key: {"2": entry("triton", TRITON_CONFIG), "64": entry("torch")}})
    put(dirs["env"], table)
    return select_rope(64, 32, 4, 2, False, torch.float32, "cpu")


def test_custom_op_declares_in_place_mutation_of_query_and_key():
    schema = torch.ops.rope_autotune.rope.default._schema
    written = {
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    }
    assert written == {"query", "key"}
    assert str(schema.arguments[2].type) == "Optional[Tensor]"


def op_calls_in_graph(fn, *args) -> list[tuple]:
    """The arguments of each ``rope_autotune::rope`` call in the graph ``torch.compile``
    captures for ``fn(*args)``: graph inputs as FX nodes, constants (the handle) as values."""
    op = torch.ops.rope_autotune.rope
    calls = []

    def backend(graph_module, example_inputs):
        graph = graph_module.graph
        calls.extend(n.args for n in graph.nodes if n.target in (op, op.default))
        return graph_module.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return calls


def test_custom_op_passes_opcheck(rope):
    """The op, called with the arguments the compiled selector passes it, passes opcheck."""
    cache = cos_sin_cache(256, SPEC.rotary_dim)
    positions = torch.randint(0, 256, (5,))
    q = torch.randn(5, 4 * 64)
    k = torch.randn(5, 2 * 64)
    for key in (k, None):
        (args,) = op_calls_in_graph(lambda p, q, k: rope(p, q, k, cache), positions, q, key)
        handle = args[4]
        assert isinstance(handle, int)
        torch.library.opcheck(
            torch.ops.rope_autotune.rope.default,
            (positions, q.clone(), None if key is None else key.clone(), cache, handle),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.slow
def test_compiled_block_matches_eager_without_recompiles(rope):
    """A fused qkv projection with RoPE on its strided q/k slices, plus a key-less call,
    compiled with fullgraph=True and a dynamic token count."""
    cache = cos_sin_cache(256, SPEC.rotary_dim)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, (4 + 2 + 2) * 64, generator=g) / 32**0.5

    def block(x, positions):
        qkv = x @ weight
        q, k, v = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
        rope(positions, q, k, cache)
        v2 = v.repeat(1, 2)  # a [T, 4*64] tensor for the key-less path
        rope(positions, v2, None, cache)
        return q + 0, k + 0, v2

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    used = set()
    with torch.inference_mode():
        for n in (3, 1, 2, 5, 17, 64, 100, 9, 40):
            x = torch.randn(n, 32, generator=g)
            positions = torch.randint(0, 256, (n,), generator=g)
            used.add(rope.explain(n).provider)
            got = compiled(x, positions)
            expected = block(x, positions)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            # RoPE really ran: the rotated part moved, the tail did not.
            q_raw = (x @ weight)[:, : 4 * 64].reshape(n, 4, 64)
            assert not torch.allclose(got[0].reshape(n, 4, 64)[..., :32], q_raw[..., :32])
            torch.testing.assert_close(got[0].reshape(n, 4, 64)[..., 32:], q_raw[..., 32:])
    assert used == {"triton", "torch"}
    # Sizes 0/1 may specialize once; every other count reuses the dynamic graph.
    assert counter.frame_count <= 2, counter.frame_count
