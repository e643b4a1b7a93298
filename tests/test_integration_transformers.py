"""The transformers adapter on small randomly initialized models (built from configs, no
download): the same logits with and without it, for batched prefill with padding and for
generation with a cache, and a clean undo. Skipped without transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.integrations.transformers import RopePatch, patch_model, unpatch_model  # noqa: E402
from kernels.testing import TOLERANCES  # noqa: E402

# No tuning table for the CPU: select_rope warns once per spec and runs the torch provider.
pytestmark = pytest.mark.filterwarnings("ignore::kernels.RopeTableWarning")

LAYERS = 2
SMALL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}


def small_model(model_type="llama", dtype=torch.float32, device="cpu", **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def padded_batch(device="cpu"):
    """Two prompts of 9 tokens, the second left-padded by 3 (as generate() pads)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SMALL["vocab_size"], (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = SMALL["pad_token_id"], 0
    return ids.to(device), mask.to(device)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_logits_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("gemma", {"head_dim": 16}),
        ("phi", {"partial_rotary_factor": 0.5}),  # passes the rotated slice of each head
        ("gpt_neox", {"rotary_pct": 0.25}),  # rotates part of the head inside the function
    ],
)
def test_batched_prefill_with_padding_gives_the_same_logits(model_type, overrides):
    model = small_model(model_type, **overrides)
    ids, mask = padded_batch()
    expected = logits(model, ids, mask)
    with patch_model(model) as patch:
        actual = logits(model, ids, mask)
        assert patch.calls == LAYERS and patch.fallbacks == 0  # every layer ran the selector
    assert_logits_close(actual, expected, torch.float32)


def test_generation_with_a_cache_gives_the_same_tokens_and_logits():
    model = small_model()
    ids, mask = padded_batch()
    options = {
        "attention_mask": mask,
        "max_new_tokens": 5,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": SMALL["pad_token_id"],
    }
    with torch.no_grad():
        expected = model.generate(ids, **options)
        patch = patch_model(model)
        actual = model.generate(ids, **options)
    patch.remove()
    assert patch.calls == LAYERS * 5  # one prefill and four decode steps through the cache
    assert torch.equal(actual.sequences, expected.sequences)
    for step_actual, step_expected in zip(actual.logits, expected.logits, strict=True):
        assert_logits_close(step_actual, step_expected, torch.float32)


def test_our_triton_kernel_in_the_model():
    model = small_model()
    ids, mask = padded_batch()
    expected = logits(model, ids, mask)
    with patch_model(model, provider="triton") as patch:
        actual = logits(model, ids, mask)
        assert [s.explain(18).provider for s in patch.selectors()] == ["triton"]
    assert_logits_close(actual, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_function_matches_transformers_in_half_precision(dtype):
    """Per call, against transformers' own apply_rotary_pos_emb on the same bf16/fp16 cos/sin."""
    from transformers.models.llama import modeling_llama

    model = small_model(dtype=dtype)
    original = modeling_llama.apply_rotary_pos_emb
    rotary = model.model.rotary_emb
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 4, 16, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(2, 7, 2, 16, generator=gen).to(dtype).transpose(1, 2)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 2, 3, 4]])
    with patch_model(model) as patch:
        cos, sin = rotary(q, position_ids)
        want_q, want_k = original(q.clone(), k.clone(), cos, sin)
        got_q, got_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        assert patch.calls == 1
    assert got_q is q and got_k is k  # rotated in place, returned as transformers' are used
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got_q, want_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_k, want_k, atol=atol, rtol=rtol)


def test_remove_restores_transformers():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    model = small_model()
    patch = patch_model(model)
    assert isinstance(patch, RopePatch)
    assert modeling_llama.apply_rotary_pos_emb is not original
    with pytest.raises(ValueError, match="applied already"):
        patch_model(model)
    assert unpatch_model(model)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not model.model.rotary_emb._forward_hooks
    assert not unpatch_model(model)
    patch.remove()  # twice is harmless
    ids, mask = padded_batch()
    logits(model, ids, mask)
    assert patch.calls == 0


def test_only_patched_models_change_and_the_last_remove_restores():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    first, second, untouched = small_model(), small_model(), small_model()
    ids, mask = padded_batch()
    expected = logits(untouched, ids, mask)
    patch_first, patch_second = patch_model(first), patch_model(second)
    try:
        assert_logits_close(logits(untouched, ids, mask), expected, torch.float32)
        assert patch_first.calls == patch_second.calls == 0  # its cos/sin belong to no patch
        patch_first.remove()
        assert modeling_llama.apply_rotary_pos_emb is not original  # the second still uses it
        assert_logits_close(logits(second, ids, mask), expected, torch.float32)
        assert patch_second.calls == LAYERS and patch_first.calls == 0
    finally:
        patch_second.remove()
    assert modeling_llama.apply_rotary_pos_emb is original


def test_autograd_runs_transformers_own_function():
    model = small_model()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    with patch_model(model) as patch:
        actual = model(input_ids=ids, attention_mask=mask).logits  # grad enabled
        actual.sum().backward()
        assert patch.calls == 0 and patch.fallbacks == LAYERS
    assert_logits_close(actual.detach(), expected, torch.float32)


def test_refuses_a_model_whose_rope_is_not_llamas():
    model = small_model("cohere")  # interleaved (GPT-J style) cos/sin: halves differ
    with pytest.raises(ValueError, match="no RoPE code path"):
        patch_model(model)
    assert not unpatch_model(model)


# -- vision-language models: multimodal RoPE (mRoPE) ---------------------------------------------

IMAGE, VISION_START, VIDEO = 151, 152, 153  # token ids inside SMALL's vocabulary
# (model type, mrope_section, mrope_interleaved): head 16, so sections sum to 8.
VL_MODELS = [
    ("qwen2_vl", [2, 3, 3], None),
    ("qwen2_5_vl", [2, 3, 3], None),
    ("qwen3_vl", [4, 2, 2], True),
    ("qwen3_vl_moe", [4, 2, 2], True),
]


def small_vl_model(model_type, section, interleaved, dtype=torch.float32, device="cpu"):
    """A random vision-language model: SMALL's text model (mRoPE with ``section``) and a one-block
    vision tower with 4x4 patches."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": section}
    if interleaved is not None:
        rope["mrope_interleaved"] = interleaved
    text = {**SMALL, "vocab_size": 160, "rope_parameters": rope, "head_dim": 16}
    vision = {"depth": 1, "num_heads": 2, "in_channels": 3, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    if model_type == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64)
    if model_type == "qwen2_5_vl":
        vision.update(window_size=16, fullatt_block_indexes=[0])
    if model_type.startswith("qwen3_vl"):
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    if model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config = transformers.AutoConfig.for_model(
        model_type, text_config=text, vision_config=vision, image_token_id=IMAGE,
        video_token_id=VIDEO, vision_start_token_id=VISION_START,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    return model.to(device, dtype).eval()


def image_batch(dtype=torch.float32, device="cpu"):
    """Two prompts with one 4x6-patch image each (6 image tokens after merging), the second
    left-padded by 3, as the processor hands them over."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for pad in (0, 3):
        text_before = torch.randint(3, 150, (5 - pad,), generator=gen)
        text_after = torch.randint(3, 150, (4,), generator=gen)
        image = torch.tensor([VISION_START] + [IMAGE] * 6)
        rows.append(torch.cat([torch.zeros(pad, dtype=torch.long), text_before, image, text_after]))
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pixels = torch.randn(2 * 4 * 6, 3 * 2 * 4 * 4, generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels.to(dtype),
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 4, 6]]),
        "mm_token_type_ids": (ids == IMAGE).int(),
    }
    return {name: value.to(device) for name, value in batch.items()}


@pytest.mark.parametrize(("model_type", "section", "interleaved"), VL_MODELS)
def test_vision_language_models_give_the_same_logits(model_type, section, interleaved):
    """transformers merges the time, height and width streams into one per-token cos/sin before
    apply_rotary_pos_emb, so the text path covers mRoPE: same logits in prefill (image tokens:
    three distinct streams) and in generation through the cache."""
    model = small_vl_model(model_type, section, interleaved)
    batch = image_batch()
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )  # fmt: skip
    assert (positions[0] != positions[1]).any() and (positions[1] != positions[2]).any()
    options = {"max_new_tokens": 3, "do_sample": False, "output_logits": True,
               "return_dict_in_generate": True, "pad_token_id": SMALL["pad_token_id"]}  # fmt: skip
    with torch.no_grad():
        expected = model(**batch).logits
        expected_generated = model.generate(**batch, **options)
        with patch_model(model) as patch:
            actual = model(**batch).logits
            assert patch.calls == LAYERS and patch.fallbacks == 0
            generated = model.generate(**batch, **options)
            assert patch.calls == LAYERS * 4 and patch.fallbacks == 0  # + prefill + 2 decodes
    # The text model's rotary module is bridged; the vision tower's RoPE stays transformers'.
    assert len(patch.rotary_modules) == 1 and "Vision" not in patch.rotary_modules[0]
    assert_logits_close(actual, expected, torch.float32)
    assert torch.equal(generated.sequences, expected_generated.sequences)
    for step, step_expected in zip(generated.logits, expected_generated.logits, strict=True):
        assert_logits_close(step, step_expected, torch.float32)


def test_text_rotary_taking_only_three_position_streams(monkeypatch):
    """Some transformers 5 releases' multimodal text rotary modules index positions [3, B, S] and
    raise on [B, S]: the probe asks again with three equal streams, and the model is bridged."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    rotary = modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding
    original = rotary.forward

    def three_streams_only(self, x, position_ids):
        if position_ids.dim() != 3:
            raise IndexError("too many indices for tensor of dimension 2")
        return original(self, x, position_ids)

    monkeypatch.setattr(rotary, "forward", three_streams_only)
    model = small_vl_model("qwen2_5_vl", [2, 3, 3], None)
    batch = image_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        with patch_model(model) as patch:
            actual = model(**batch).logits
            assert patch.calls == LAYERS and patch.fallbacks == 0
    assert patch.rotary_modules == ("Qwen2_5_VLRotaryEmbedding",)
    assert_logits_close(actual, expected, torch.float32)


def test_refuses_per_stream_cos_sin(monkeypatch):
    """A rotary module returning cos/sin per stream, [3, B, S, D], for the attention layers to
    merge (transformers 4's apply_multimodal_rotary_pos_emb) is not a per-token cache."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    def per_stream(self, freq):  # no merge: the three streams' angles, both halves
        return torch.cat((freq, freq), dim=-1)

    rotary = modeling_qwen2_vl.Qwen2VLRotaryEmbedding
    monkeypatch.setattr(rotary, "recomposition_frequencies", per_stream)
    model = small_vl_model("qwen2_vl", [2, 3, 3], None)
    with pytest.raises(ValueError, match=r"Qwen2VLRotaryEmbedding: it returned per-stream cos"):
        patch_model(model)
    assert not unpatch_model(model)


@pytest.mark.gpu
@pytest.mark.parametrize(("model_type", "section", "interleaved"), VL_MODELS[1:3])
def test_vision_language_models_on_the_gpu(model_type, section, interleaved):
    model = small_vl_model(model_type, section, interleaved, torch.bfloat16, "cuda")
    batch = image_batch(torch.bfloat16, "cuda")
    with torch.no_grad():
        expected = model(**batch).logits
        with patch_model(model) as patch:
            actual = model(**batch).logits
            assert patch.calls == LAYERS and patch.fallbacks == 0
    torch.testing.assert_close(actual.float(), expected.float(), atol=0.1, rtol=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_generation_on_the_gpu(dtype):
    model = small_model(dtype=dtype, device="cuda")
    ids, mask = padded_batch("cuda")
    expected = logits(model, ids, mask)
    with patch_model(model) as patch:
        actual = logits(model, ids, mask)
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        assert patch.calls == LAYERS * 4 and patch.fallbacks == 0
    # bf16: transformers rounds after each of its RoPE ops, the kernels once; the logits of a
    # random model stay within a few bf16 steps.
    atol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=atol)
