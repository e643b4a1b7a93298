"""``benchmarks/roofline.py``: its specs come from the tuner's model presets or spec keys."""

from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

from autotune.models import MODEL_PRESETS
from kernels import RopeSpec

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "roofline.py"


@pytest.fixture(scope="module")
def roofline():
    return load_benchmark("roofline")


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_resolves_to_its_spec(roofline, name):
    (expected,) = MODEL_PRESETS[name].specs([torch.float16], [1])
    assert roofline.resolve_spec(name, torch.float16) == expected


def test_tensor_parallel_and_spec_keys(roofline):
    bf16 = torch.bfloat16
    assert roofline.resolve_spec("llama-3-70b:tp8", bf16) == RopeSpec(128, 128, 8, 1, True, bf16)
    key = "q48_kv48_d128_r32_neox_bfloat16"
    assert roofline.resolve_spec(key, torch.float16) == RopeSpec(128, 32, 48, 48, True, "fp16")
    assert [roofline.resolve_spec(n, bf16) for n in roofline.DEFAULT_SPECS]


@pytest.mark.parametrize(
    ("name", "message"),
    [("llama3-8b", "neither a spec key nor a preset"), ("qwen2.5-7b:tp8", "tensor_parallel")],
)
def test_unknown_spec_is_refused(roofline, name, message):
    with pytest.raises(SystemExit, match=message):
        roofline.resolve_spec(name, torch.bfloat16)
