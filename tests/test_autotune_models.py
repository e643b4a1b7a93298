"""The shape space: presets, tensor-parallel splits, Hugging Face configs, token buckets."""

import dataclasses
from pathlib import Path

import pytest
import torch

from autotune.models import (
    CPU_DEFAULT_MODELS,
    DEFAULT_TOKENS,
    MAX_TOKENS,
    MODEL_PRESETS,
    MROPE_MODELS,
    default_specs,
    get_preset,
    load_hf_config,
    parse_tokens,
    shard_heads,
    spec_from_hf_config,
)
from kernels import RopeSpec

FIXTURES = Path(__file__).parent / "fixtures"

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# (fixture, tensor-parallel size, expected (head, rotary, heads, kv heads, neox, dtype))
HF_CASES = [
    ("hf_llama3_8b.json", 1, (128, 128, 32, 8, True, BF16)),
    ("hf_llama3_8b.json", 4, (128, 128, 8, 2, True, BF16)),
    ("hf_llama3_8b.json", 16, (128, 128, 2, 1, True, BF16)),  # kv heads replicated
    ("hf_gemma2_9b.json", 1, (256, 256, 16, 8, True, FP32)),  # head_dim wins over 3584/16
    ("hf_gemma2_9b.json", 2, (256, 256, 8, 4, True, FP32)),
    ("hf_gptj_6b.json", 1, (256, 64, 16, 16, False, FP32)),  # rotary_dim, GPT-J style
    ("hf_pythia_6.9b.json", 1, (128, 32, 32, 32, True, FP16)),  # rotary_pct 0.25
    ("hf_phi2.json", 1, (80, 32, 32, 32, True, FP16)),  # partial_rotary_factor 0.4
    ("hf_qwen2.5_7b.json", 1, (128, 128, 28, 4, True, BF16)),
    ("hf_qwen2.5_7b.json", 4, (128, 128, 7, 1, True, BF16)),
    ("hf_deepseek_v2_lite.json", 1, (64, 64, 16, 1, False, BF16)),  # MLA rope part
    ("hf_gemma3_4b.json", 1, (256, 256, 8, 4, True, BF16)),  # under text_config
    ("hf_gemma3_4b.json", 4, (256, 256, 2, 1, True, BF16)),
]


@pytest.mark.parametrize(("fixture", "tp", "expected"), HF_CASES)
def test_spec_from_hf_config(fixture, tp, expected):
    config = load_hf_config(FIXTURES / fixture)
    assert spec_from_hf_config(config, tensor_parallel_size=tp) == RopeSpec(*expected)


def test_hf_config_overrides_and_directory(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "hf_llama3_8b.json").read_text())
    config = load_hf_config(tmp_path)  # a model directory works too
    spec = spec_from_hf_config(config, dtype="fp16", is_neox=False)
    assert (spec.dtype, spec.is_neox) == (FP16, False)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"hidden_size": 4096}, "num_attention_heads"),
        ({"num_attention_heads": 32}, "hidden_size"),
        ({"num_attention_heads": 3, "hidden_size": 128}, "hidden_size"),
        ({"num_attention_heads": 32, "hidden_size": 4096, "torch_dtype": "int8"}, "dtype"),
    ],
)
def test_hf_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config(config)


LLAMA = {"num_attention_heads": 32, "hidden_size": 4096, "num_key_value_heads": 8}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("head_dim", [128]),
        ("head_dim", {"q": 128}),
        ("head_dim", 127.5),
        ("head_dim", "128"),
        ("head_dim", 0),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", [8]),
        ("num_key_value_heads", {"a": 8}),
        ("num_key_value_heads", 7.5),
        ("num_key_value_heads", True),
        ("rotary_dim", [64]),
        ("rotary_dim", {"a": 64}),
        ("rotary_dim", 63.5),
        ("partial_rotary_factor", [0.5]),
        ("partial_rotary_factor", 1.5),
        ("partial_rotary_factor", 0),
        ("num_attention_heads", 32.5),
        ("hidden_size", [4096]),
    ],
)
def test_hf_config_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"model_config: {field}: expected"):
        spec_from_hf_config({**LLAMA, field: value})


def test_hf_config_integral_floats_are_counts():
    config = {**LLAMA, "head_dim": 128.0, "num_key_value_heads": 8.0, "rotary_dim": 64.0}
    assert spec_from_hf_config(config) == RopeSpec(128, 64, 32, 8, True, BF16)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        {"rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}},
        {"rope_parameters": {"full_attention": {"mrope_section": [16, 24, 24]}}},
        {"text_config": {**LLAMA, "rope_scaling": {"mrope_section": [16, 24, 24]}}},
    ],
)
def test_hf_config_mrope_section_is_read(rope):
    config = rope if "text_config" in rope else {**LLAMA, **rope}
    assert spec_from_hf_config(config) == RopeSpec(
        128, 128, 32, 8, True, BF16, mrope_section=(16, 24, 24)
    )


def test_hf_config_qwen2_vl():
    spec = spec_from_hf_config(load_hf_config(FIXTURES / "hf_qwen2_vl_7b.json"))
    assert spec.key == "q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24"


def test_hf_config_qwen3_vl_interleaved():
    # Qwen3-VL's layout: text_config with rope_scaling holding the interleaved flag.
    text = {**LLAMA, "head_dim": 128, "rope_scaling": {"rope_type": "default",
            "mrope_section": [24, 20, 20], "mrope_interleaved": True}}  # fmt: skip
    spec = spec_from_hf_config({"model_type": "qwen3_vl", "text_config": text})
    assert spec.mrope_section == (24, 20, 20) and spec.mrope_interleaved
    assert spec.key.endswith("_mropei24-20-20")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ([8], "three non-negative integers"),
        ([16, 24, "24"], "three non-negative integers"),
        ([16, 24, -1], "three non-negative integers"),
        ([16, 24, 20], "summing to rotary_dim // 2 = 64"),
    ],
)
def test_hf_config_bad_mrope_section_is_named(section, message):
    config = {**LLAMA, "rope_scaling": {"mrope_section": section}}
    with pytest.raises(ValueError, match=rf"^model_config: .*mrope_section.*{message}"):
        spec_from_hf_config(config)


def test_hf_config_tp_must_divide_heads():
    config = load_hf_config(FIXTURES / "hf_qwen2.5_7b.json")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        spec_from_hf_config(config, tensor_parallel_size=8)  # 28 heads


def test_load_hf_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_config"):
        load_hf_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_hf_config(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "expected"),
    [
        (32, 8, 1, (32, 8)),
        (32, 8, 8, (4, 1)),
        (64, 8, 8, (8, 1)),
        (16, 16, 4, (4, 4)),
        (128, 1, 8, (16, 1)),
    ],
)
def test_shard_heads(heads, kv, tp, expected):
    assert shard_heads(heads, kv, tp) == expected


@pytest.mark.parametrize("tp", [0, 3, -1, True])
def test_shard_heads_rejects(tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        shard_heads(32, 8, tp)


def test_presets_cover_the_default_model_space():
    keys = {s.key for p in MODEL_PRESETS.values() for s in p.specs()}
    # Llama-3 8B and 70B at TP 1, 2, 4, 8 in bf16 and fp16.
    for heads, kv in [(32, 8), (16, 4), (8, 2), (4, 1), (64, 8), (32, 4), (16, 2), (8, 1)]:
        for dtype in ("bfloat16", "float16"):
            assert f"q{heads}_kv{kv}_d128_r128_neox_{dtype}" in keys
    for key in [
        "q28_kv4_d128_r128_neox_bfloat16",  # Qwen2.5 7B
        "q16_kv8_d256_r256_neox_float16",  # Gemma-2 9B
        "q16_kv16_d256_r64_gptj_bfloat16",  # GPT-J 6B
        "q32_kv32_d128_r32_neox_bfloat16",  # Pythia / GPT-NeoX
        "q32_kv32_d80_r32_neox_float16",  # Phi-2
        "q128_kv1_d64_r64_gptj_bfloat16",  # DeepSeek-V2 rope part
    ]:
        assert key in keys
    assert get_preset("Mistral-7B").specs((BF16,)) == get_preset("llama-3-8b").specs((BF16,), [1])
    with pytest.raises(ValueError, match="llama-3-8b"):
        get_preset("llama-9")


def test_default_specs():
    gpu = default_specs("cuda:0")
    assert len(gpu) == len(set(gpu))  # Mistral 7B and Llama-3 8B share a spec: listed once
    assert {s.dtype for s in gpu} == {BF16, FP16}
    assert len(gpu) == 2 * len({dataclasses.replace(s, dtype=BF16) for s in gpu})
    cpu = default_specs("cpu")
    assert len(cpu) == len(CPU_DEFAULT_MODELS) < len(gpu)
    assert {s.dtype for s in cpu} == {BF16}
    assert tuple(2**i for i in range(17)) == DEFAULT_TOKENS


def test_default_specs_by_layout():
    plain, mrope = default_specs("cuda:0", ["rope"]), default_specs("cuda:0", ["mrope"])
    assert default_specs("cuda:0") == plain + mrope
    assert not any(s.is_mrope for s in plain) and all(s.is_mrope for s in mrope)
    keys = {s.key for s in mrope}
    for key in [
        "q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24",  # Qwen2.5-VL 7B, Qwen2-VL 7B
        "q12_kv2_d128_r128_neox_float16_mrope16-24-24",  # Qwen2-VL 2B
        "q32_kv8_d128_r128_neox_bfloat16_mropei24-20-20",  # Qwen3-VL 8B
        "q32_kv4_d128_r128_neox_bfloat16_mropei24-20-20",  # Qwen3-VL 30B-A3B
    ]:
        assert key in keys
    assert {get_preset(name).layout for name in MROPE_MODELS} == {"mrope"}
    assert default_specs("cpu", ["mrope"]) == []
    with pytest.raises(ValueError, match="layouts"):
        default_specs("cuda:0", ["vision"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,16,256", [1, 16, 256]), ("256, 1,1", [1, 256]), ([4, 2], [2, 4]), ("7", [7])],
)
def test_parse_tokens(text, expected):
    assert parse_tokens(text) == expected


@pytest.mark.parametrize(
    "text", ["", "0", "1,-2", "a", "1.5", "99999999999999999999", str(MAX_TOKENS + 1)]
)
def test_parse_tokens_rejects(text):
    with pytest.raises(ValueError, match="tokens"):
        parse_tokens(text)


def test_parse_tokens_accepts_the_maximum():
    assert parse_tokens(f"1,{MAX_TOKENS}") == [1, MAX_TOKENS]
