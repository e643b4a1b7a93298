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
