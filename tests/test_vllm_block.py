"""``benchmarks/vllm_block.py``: the attention blocks it builds, its check and its table.

On the CPU vLLM's op does not exist, so ``vllm-op`` is built (its layer is vLLM's class on its
``forward_cuda``) but not run; the override runs the ``torch`` provider, eagerly and compiled.
"""

import csv

import pytest
import torch
from conftest import load_benchmark

pytest.importorskip("vllm.model_executor.layers.rotary_embedding")

from kernels.integrations import vllm as plugin

# No tuning table for the CPU: select_rope warns once per spec and runs the torch provider.
pytestmark = pytest.mark.filterwarnings("ignore::kernels.RopeTableWarning")

DTYPE = torch.bfloat16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vb():
    return load_benchmark("vllm_block")


@pytest.fixture(scope="module")
def blocks(vb):
    """Each model's blocks on the CPU: vllm-default, ours and no-rope (vLLM's op cannot run)."""
    return {
        name: vb.build_blocks(model, ["vllm-default", "ours"], DTYPE, CPU)
        for name, model in vb.MODELS.items()
    }


def run(block, positions, hidden):
    with torch.no_grad():
        return block(positions, hidden)


@pytest.mark.parametrize("variant", ["vllm-default", "vllm-op", "ours"])
def test_each_variant_builds_its_own_layer_and_path(vb, variant):
    before = plugin.registered_overrides()
    layer = vb.build_rope(vb.MODELS["llama3-8b"], variant, DTYPE, CPU)
    cls = type(layer)
    assert (cls.__module__ == plugin.__name__) == (variant == "ours")
    assert cls.__name__.endswith("Llama3RotaryEmbedding")
    path = cls.forward_native if variant == "vllm-default" else cls.forward_cuda
    assert layer._forward_method.__func__ is path
    assert plugin.registered_overrides() == before  # the plugin's state is left as it was


@pytest.mark.parametrize("model", ["llama3-8b", "qwen3-8b", "phi-2"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_ours_agrees_with_vllm_default_and_rotates(vb, blocks, model, tokens):
    spec = vb.MODELS[model]
    positions, hidden = vb.make_inputs(spec, tokens, DTYPE, CPU)
    want = run(blocks[model]["vllm-default"], positions, hidden)
    got = run(blocks[model]["ours"], positions, hidden)
    plain = run(blocks[model][vb.NO_ROPE], positions, hidden)
    assert [x.shape for x in want] == [
        (tokens, spec.hidden_size),
        (tokens, spec.q_size),
        (tokens, spec.kv_size),
    ]
    reference = vb.reference_block(blocks[model]["vllm-default"], positions, hidden)
    assert [x.dtype for x in reference] == [torch.float64] * 3
    baseline = vb.errors(reference, want)
    diff, reason = vb.compare(reference, got, DTYPE, baseline)
    assert reason is None, reason
    assert 0 < diff < 0.05
    # The check sees RoPE even for one token, whose attention output it does not change.
    _, reason = vb.compare(reference, plain, DTYPE, baseline)
    assert reason is not None
    if tokens == 1:
        assert torch.equal(want[0], plain[0]) and reason.startswith("q:")


def test_reference_block_is_the_block_in_float64(vb, blocks):
    """The float64 block against the eager block run in float32 (weights upcast, its own
    rotary layer's cache): the same math, so they agree to float32's precision."""
    model = vb.MODELS["qwen3-8b"]
    block = blocks["qwen3-8b"]["vllm-default"]
    positions, hidden = vb.make_inputs(model, 37, DTYPE, CPU)
    reference = vb.reference_block(block, positions, hidden)
    weights = {
        name: None if w is None else w.float()
        for name, w in {
            "qkv": block.qkv_weight, "qkv_bias": block.qkv_bias, "o": block.o_weight,
            "o_bias": block.o_bias, "q_norm": block.q_norm.weight, "k_norm": block.k_norm.weight,
        }.items()
    }  # fmt: skip
    rotary = vb.build_rope(model, "vllm-default", torch.float32, CPU)
    rotary.cos_sin_cache.copy_(block.rotary.cos_sin_cache.float())
    got = run(vb.AttentionBlock(model, weights, rotary), positions, hidden.float())
    for want, have in zip(reference, got, strict=True):
        torch.testing.assert_close(have.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["qwen3-8b", "phi-2"])
def test_no_rope_block_is_the_block_at_position_zero(vb, blocks, model):
    spec = vb.MODELS[model]
    _, hidden = vb.make_inputs(spec, 8, DTYPE, CPU)
    zeros = torch.zeros(8, dtype=torch.int64)
    rotated_by_zero = run(blocks[model]["vllm-default"], zeros, hidden)
    plain = run(blocks[model][vb.NO_ROPE], zeros + 5, hidden)
    for a, b in zip(rotated_by_zero, plain, strict=True):
        assert torch.equal(a, b)
    # Its q is the projection's q columns, normed for Qwen3.
    block = blocks[model][vb.NO_ROPE]
    q = torch.nn.functional.linear(hidden, block.qkv_weight, block.qkv_bias)[:, : spec.q_size]
    if spec.qk_norm:
        q = block.q_norm(q.view(8, spec.num_heads, spec.head_size)).view(q.shape)
    assert torch.equal(plain[1], q)


def test_compare_bounds_errors_by_the_baseline(vb):
    ref = (torch.full((4, 4), 10.0), torch.ones(2, 8), torch.ones(2, 8))
    ref = tuple(x.double() for x in ref)
    baseline = (0.2, 0.05, 0.05)
    near = (ref[0] + 0.35, ref[1] + 0.09, ref[2])
    diff, reason = vb.compare(ref, near, DTYPE, baseline)
    assert reason is None and diff == pytest.approx(0.35)
    far = (ref[0], ref[1], ref[2].clone())
    far[2][1, 3] = 1.11
    assert (
        vb.compare(ref, far, DTYPE, baseline)[1] == "k: largest difference 0.11 over the bound 0.1"
    )
    # No baseline error: the bound is the dtype's rtol times the reference's rms.
    assert vb.compare(ref, far, DTYPE, (0.0, 0.0, 0.0))[1].endswith("over the bound 0.016")
    nan = (ref[0].clone(), ref[1], ref[2])
    nan[0][0, 0] = float("nan")
    assert vb.compare(ref, nan, DTYPE, baseline)[1].startswith("out: largest difference inf")
    assert vb.errors(ref, nan)[0] == float("inf")


def test_fill_times_rope_share_and_speedups(vb):
    row = {}
    vb.fill_times(row, {"no-rope": 100.0, "vllm-default": 110.0, "vllm-op": 108.0, "ours": 104.0})
    assert row["rope_vllm_default_us"] == "10.00"
    assert row["rope_vllm_op_us"] == "8.00"
    assert row["rope_ours_us"] == "4.00"
    assert row["speedup_vs_vllm_default"] == f"{110 / 104:.3f}"
    assert row["speedup_vs_vllm_op"] == f"{108 / 104:.3f}"
    row = {}
    vb.fill_times(row, {"vllm-default": 110.0, "ours": 100.0})  # no vllm-op, no no-rope
    assert row["vllm_op_us"] == row["rope_ours_us"] == row["speedup_vs_vllm_op"] == "-"
    assert row["speedup_vs_vllm_default"] == "1.100"


def read_rows(folder):
    with open(folder / "vllm_block.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_cpu_smoke_run_writes_the_table(vb, tmp_path):
    argv = ["--device", "cpu", "--models", "phi-2", "--tokens", "1,2", "--no-compile"]
    assert vb.main([*argv, "--repeats", "1", "--out", str(tmp_path)]) == 0
    fields, rows = read_rows(tmp_path)
    assert fields == vb.FIELDS
    assert [(r["model"], r["tokens"]) for r in rows] == [("phi-2", "1"), ("phi-2", "2")]
    for r in rows:
        assert r["mode"] == "eager+cpu-wall" and r["device"] == "cpu"
        assert r["check"].startswith("vllm-op n/a")
        assert r["vllm_op_us"] == r["speedup_vs_vllm_op"] == "-"
        for key in ("vllm_default_us", "ours_us", "no_rope_us", "speedup_vs_vllm_default"):
            assert float(r[key]) > 0
        assert float(r["rope_ours_us"]) == pytest.approx(
            float(r["ours_us"]) - float(r["no_rope_us"]), abs=0.02
        )
    text = (tmp_path / "vllm_block.txt").read_text()
    assert text.startswith("# cpu; torch ") and "vllm " in text
    assert text.count("| phi-2 |") == 2


def test_a_failed_check_is_reported_and_not_timed(vb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vb, "compare", lambda reference, got, *args: (0.5, "q: forced"))
    argv = ["--device", "cpu", "--models", "phi-2", "--tokens", "1", "--no-compile"]
    assert vb.main([*argv, "--repeats", "1", "--out", str(tmp_path)]) == 1
    _, rows = read_rows(tmp_path)
    assert "ours FAIL" in rows[0]["check"] and rows[0]["max_diff_ours"] == "0.5"
    assert rows[0]["ours_us"] == rows[0]["speedup_vs_vllm_default"] == "-"
    assert float(rows[0]["vllm_default_us"]) > 0
    assert "FAIL phi-2 1 ours: q: forced" in capsys.readouterr().err


def test_unknown_model_is_refused(vb, tmp_path):
    assert vb.main(["--device", "cpu", "--models", "gpt-5", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_compiled_blocks_agree_on_the_cpu(vb, tmp_path):
    argv = ["--device", "cpu", "--models", "qwen3-8b", "--tokens", "3", "--repeats", "1"]
    assert vb.main([*argv, "--out", str(tmp_path)]) == 0
    _, rows = read_rows(tmp_path)
    assert rows[0]["mode"] == "compiled+cpu-wall"
    assert float(rows[0]["max_diff_ours"]) < 0.1


@pytest.mark.gpu
def test_eager_blocks_on_the_gpu(vb, tmp_path):
    argv = ["--device", "cuda:0", "--models", "phi-2", "--tokens", "16", "--no-compile"]
    assert vb.main([*argv, "--rep-ms", "5", "--out", str(tmp_path)]) == 0
    _, rows = read_rows(tmp_path)
    assert rows[0]["check"] == "ok"
    assert float(rows[0]["vllm_op_us"]) > 0 and float(rows[0]["ours_us"]) > 0
