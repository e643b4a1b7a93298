"""Providers describe themselves: the selection and the model name no provider, and a second
tunable provider, registered here without touching them, gets its space, restrictions,
defaults, untuned fallback, model features and predicted picks honoured."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _constant, put_model

from kernels import RopeSpec, RopeTableWarning, get_provider, provider_names, select_rope
from kernels.perf_features import CALL_FEATURES
from kernels.perf_model import FEATURES_VERSION, SCHEMA_VERSION, PerfModel, feature_names
from kernels.providers import Provider, Restriction, fallback_providers, reference_provider
from kernels.table import device_metadata

ROOT = Path(__file__).resolve().parent.parent
# Where the selection, the untuned fallback and the performance model are decided.
GENERIC_MODULES = (
    "kernels/_routes.py",
    "kernels/_predicted.py",
    "kernels/perf_features.py",
    "kernels/perf_model.py",
    "kernels/_perf_model_format.py",
)


def _code_strings_and_names(path: Path) -> tuple[set[str], set[str]]:
    """String constants outside docstrings, and the names used, of the module at ``path``."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    strings, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                strings.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return strings, names


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_the_selection_and_the_model_name_no_provider(module):
    strings, names = _code_strings_and_names(ROOT / module)
    named = {s for s in strings for p in provider_names() if p in s.split()}
    assert not named and not strings & set(provider_names()), named
    assert not {n for n in names if n.isupper() and n.lower() in provider_names()}


UNROLLS = (1, 2, 4)


@dataclass(frozen=True)
class UnrollProvider(Provider):
    """A tunable stand-in: the torch math, with one parameter that must not exceed the query
    heads; the untuned choice on the CPU; one feature of its own."""

    name: str = "test_unroll"
    description: str = "test: torch math with an unroll parameter"
    param_space: dict[str, tuple[Any, ...]] = field(default_factory=lambda: {"unroll": UNROLLS})
    restrictions: tuple[Restriction, ...] = (
        Restriction(
            "heads",
            lambda spec, config: config["unroll"] <= spec.num_heads,
            "unroll={config[unroll]} is over the {spec.num_heads} query heads ({note})",
        ),
    )
    fallback_on: tuple[str, ...] = ("cpu",)

    def default_config(self, spec: RopeSpec, num_tokens: int | None = None) -> dict[str, Any]:
        return {"unroll": 2 if num_tokens is not None and num_tokens >= 64 else 1}

    def restriction_facts(self, spec: RopeSpec, config: dict[str, Any]) -> dict[str, Any]:
        return {"note": "a test rule"}

    def feature_names(self) -> tuple[str, ...]:
        return (*CALL_FEATURES, "log_unroll")

    def features(self, spec, num_tokens, config=None, *, sm_count):
        return [*super().features(spec, num_tokens, sm_count=sm_count), math.log(config["unroll"])]

    def build(self, spec: RopeSpec, config: dict[str, Any]):
        return get_provider("torch").callable_for(spec)


SPEC = RopeSpec(64, 32, 2, 1, True, torch.float32)
SELECT = dict(head_size=64, rotary_dim=32, num_heads=2, num_kv_heads=1, is_neox=True)


@pytest.fixture
def unroll(registered):
    return registered(UnrollProvider())


def test_it_describes_its_space(unroll):
    assert unroll.tunable and not get_provider("torch").tunable
    assert unroll.candidates(SPEC) == [{"unroll": 1}, {"unroll": 2}]
    assert unroll.config_problems(SPEC, {"unroll": 4}) == [
        "unroll=4 is over the 2 query heads (a test rule)"
    ]
    with pytest.raises(ValueError, match=r"invalid for q2_kv1.*unroll=4"):
        unroll.check_config(SPEC, {"unroll": 4})
    assert unroll.check_config(SPEC, None) == {"unroll": 1}


def test_it_is_the_untuned_choice_where_it_says(unroll, dirs):
    assert fallback_providers("cpu") == [unroll] and unroll not in fallback_providers("cuda")
    assert reference_provider().name == "torch"
    with pytest.warns(RopeTableWarning, match="using test_unroll's default config, else torch"):
        rope = select_rope(**SELECT, dtype=torch.float32, device="cpu")
    assert rope.explain(1).provider == "test_unroll" and rope.explain(1).config == {"unroll": 1}
    assert rope.explain(100).config == {"unroll": 2}  # its default for that bucket


def _model(unroll_tree: dict) -> dict:
    part = {"base": 0.0, "learning_rate": 1.0}
    return {
        "schema_version": SCHEMA_VERSION,
        "features_version": FEATURES_VERSION,
        "metadata": device_metadata("cpu"),
        "providers": {
            "torch": {**part, "features": list(feature_names("torch")), "base": 5.0,
                      "trees": [_constant(0.0)]},
            "test_unroll": {**part, "features": list(feature_names("test_unroll")),
                            "trees": [unroll_tree]},
        },
    }  # fmt: skip


def test_the_model_reads_its_features_and_ranks_its_configs(unroll, dirs):
    assert feature_names("test_unroll") == (*CALL_FEATURES, "log_unroll")
    at = len(CALL_FEATURES)
    # Time falls with unroll: 4 would be fastest, but breaks the rule for 2 query heads.
    faster_unrolled = {
        "feature": [at, -1, -1],
        "threshold": [0.5, 0.0, 0.0],
        "left": [1, -1, -1],
        "right": [2, -1, -1],
        "value": [0.0, 1.0, -1.0],
    }
    data = _model(faster_unrolled)
    model = PerfModel(data)
    assert model.rank_configs("test_unroll", SPEC, 8) == [{"unroll": 2}, {"unroll": 1}]
    pick = model.best(SPEC, 8, ["torch", "test_unroll"])
    assert (pick.provider, pick.config) == ("test_unroll", {"unroll": 2})
    with pytest.raises(ValueError, match="test_unroll provider's time depends on its config"):
        model.predict_us("test_unroll", SPEC, 8)

    put_model(dirs["shipped"], data)
    rope = select_rope(**SELECT, dtype=torch.float32, device="cpu")
    explained = rope.explain(8)
    assert (explained.provider, explained.config) == ("test_unroll", {"unroll": 2})
    assert "predicted" in explained.why
