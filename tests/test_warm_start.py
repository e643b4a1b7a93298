"""``autotune.warm_start.model_candidates``: what a new study measures first."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from autotune.space import Candidate
from autotune.warm_start import WARM_START_CONFIGS, model_candidates
from kernels import RopeSpec, get_provider
from kernels.perf_model import PerfModel

QWEN2_VL_2B = RopeSpec(128, 128, 12, 2, True, torch.bfloat16, mrope_section=(16, 24, 24))
TWIN = dataclasses.replace(QWEN2_VL_2B, mrope_section=None)


@pytest.fixture(scope="module")
def model():
    return PerfModel.load(ROOT / "configs" / "NVIDIA_H100_80GB_HBM3.model.json")


def first(model, spec, tokens, providers):
    key, space = SimpleNamespace(spec=spec, tokens=tokens), SimpleNamespace(providers=providers)
    return model_candidates(model)(key, space)


@pytest.mark.parametrize("tokens", [1, 256, 16384])
def test_an_mrope_study_starts_from_the_configs_ranked_for_its_plain_twin(model, tokens):
    got = first(model, QWEN2_VL_2B, tokens, ("torch", "triton_mrope", "vllm_mrope"))
    ranked = model.rank_configs("triton", TWIN, tokens, WARM_START_CONFIGS)
    assert got == [Candidate("triton_mrope", c) for c in ranked] and len(got) == WARM_START_CONFIGS
    mrope = get_provider("triton_mrope")
    assert all(not mrope.config_problems(QWEN2_VL_2B, c.config) for c in got)


def test_a_rope_study_starts_from_its_own_ranking_and_a_study_without_triton_from_nothing(model):
    got = first(model, TWIN, 64, ("torch", "triton", "vllm"))
    assert got == [Candidate("triton", c) for c in model.rank_configs("triton", TWIN, 64, 8)]
    assert first(model, TWIN, 64, ("torch", "vllm")) == []
    assert first(model, QWEN2_VL_2B, 64, ("torch", "vllm_mrope")) == []
