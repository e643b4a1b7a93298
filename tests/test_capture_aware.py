"""Eager calls follow eager-timed entries, captured ones graph-timed entries
(``kernels.integrations._capture_aware``)."""

from dataclasses import dataclass

import pytest
import torch
from conftest import TINY, entry, make_table, put

from kernels import get_provider, select_rope
from kernels.integrations import _capture_aware as capture_mod
from kernels.integrations._capture_aware import CaptureAwareRope, capture_aware, same_plan
from kernels.providers import Provider
from kernels.testing import rope_reference

ARGS = (16, 16, 2, 1, True, torch.float32)  # TINY's select_rope arguments


@dataclass(frozen=True)
class _Recording(Provider):
    """PyTorch's op under another name that appends its name to ``calls`` on every call."""

    name: str = "test_recording"
    description: str = "the torch provider, recording its calls"
    calls: list = None

    def build(self, spec, config):
        run = get_provider("torch").callable_for(spec, {})

        def recorded(*args):
            self.calls.append(self.name)
            run(*args)

        return recorded


@pytest.fixture
def recorders(registered):
    calls: list[str] = []
    graph = registered(_Recording(name="test_graph_rope", calls=calls))
    eager = registered(_Recording(name="test_eager_rope", calls=calls))
    return graph.name, eager.name, calls


def _inputs(num_tokens=5):
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 64, (num_tokens,), generator=g)
    query = torch.randn(num_tokens, 2 * 16, generator=g)
    key = torch.randn(num_tokens, 1 * 16, generator=g)
    angles = torch.randn(64, 8, generator=g)
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return positions, query, key, cache


def test_a_table_without_eager_entries_gives_one_plan(dirs):
    put(dirs["env"], make_table(graph={TINY.key: {"4": entry("torch"), "64": entry("torch")}}))
    graph, eager = select_rope(*ARGS, "cpu"), select_rope(*ARGS, "cpu", timing="eager")
    assert same_plan(graph, eager)


def test_eager_entries_that_pick_another_provider_give_two_plans(dirs, recorders):
    graph_name, eager_name, _ = recorders
    put(
        dirs["env"],
        make_table(
            graph={TINY.key: {"4": entry(graph_name), "64": entry(graph_name)}},
            eager={TINY.key: {"4": entry(eager_name), "64": entry(graph_name)}},
        ),
    )
    graph, eager = select_rope(*ARGS, "cpu"), select_rope(*ARGS, "cpu", timing="eager")
    assert not same_plan(graph, eager)
    assert eager.explain(4).provider == eager_name
    # Nothing is captured on the CPU: the graph selector serves every call there.
    assert capture_aware(graph, eager) is graph


@pytest.mark.parametrize("capturing", [False, True])
def test_dispatch_follows_the_capture_state(monkeypatch, recorders, capturing):
    graph_name, eager_name, calls = recorders
    rope = CaptureAwareRope(
        select_rope(*ARGS, "cpu", provider=graph_name),
        select_rope(*ARGS, "cpu", provider=eager_name),
    )
    monkeypatch.setattr(capture_mod, "_capturing", lambda: capturing)
    positions, query, key, cache = _inputs()
    want_q, want_k = rope_reference(positions, query, key, cache, 16, True)
    rope(positions, query, key, cache)
    assert calls == [graph_name if capturing else eager_name]
    torch.testing.assert_close(query.view(5, 2, 16).double(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key.view(5, 1, 16).double(), want_k, atol=1e-5, rtol=1e-5)


def test_selectors_of_two_specs_are_refused():
    other = (16, 16, 4, 1, True, torch.float32)
    with pytest.raises(ValueError, match="eager"):
        CaptureAwareRope(
            select_rope(*ARGS, "cpu", provider="torch"),
            select_rope(*other, "cpu", provider="torch"),
        )


@pytest.mark.gpu
def test_a_captured_graph_records_the_graph_plan_gpu(recorders):
    graph_name, eager_name, calls = recorders
    rope = CaptureAwareRope(
        select_rope(*ARGS, "cuda", provider=graph_name),
        select_rope(*ARGS, "cuda", provider=eager_name),
    )
    positions, query, key, cache = (t.cuda() for t in _inputs(64))
    rope(positions, query, key, cache)  # eager, before capture
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        rope(positions, query, key, cache)
    assert calls == [eager_name, graph_name]
