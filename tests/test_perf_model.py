"""The performance model: file validation, deterministic predictions, config ranking, the
between-buckets choice, and the fit -> save -> load round trip."""

import copy
import itertools
import math
import warnings
from pathlib import Path

import orjson
import pytest
import torch

from kernels import RopeSpec, RopeTableWarning, get_provider
from kernels.perf_model import (
    FEATURES_VERSION,
    SCHEMA_VERSION,
    PerfModel,
    PerfModelError,
    choose_between_buckets,
    feature_names,
    features,
    model_file_name,
    validate_model,
)
from kernels.providers import TRITON

config_problems = get_provider(TRITON).config_problems
triton_candidates = get_provider(TRITON).candidates

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / model_file_name("NVIDIA H200")

# The real matrix: NeoX and GPT-J, full and partial rotary, grouped-query heads, fp16 and bf16.
SPECS = [
    RopeSpec(128, 128, 32, 8, True, torch.bfloat16),
    RopeSpec(96, 48, 12, 4, False, torch.float16),
    RopeSpec(64, 32, 6, 1, True, torch.float16),
    RopeSpec(256, 256, 8, 8, True, torch.bfloat16),
]


def _stump(feature: int, threshold: float, low: float, high: float) -> dict:
    return {
        "feature": [feature, -1, -1],
        "threshold": [threshold, 0.0, 0.0],
        "left": [1, -1, -1],
        "right": [2, -1, -1],
        "value": [0.0, low, high],
    }


def _model() -> dict:
    """A small valid model: time grows with tokens (vendors) and with log_steps (Triton)."""
    triton_names = feature_names(TRITON)
    steps, tokens = triton_names.index("log_steps"), triton_names.index("log_tokens")
    vendor_tokens = feature_names("vllm").index("log_tokens")
    return {
        "schema_version": SCHEMA_VERSION,
        "features_version": FEATURES_VERSION,
        "metadata": {"device_name": "Test GPU", "sm_count": 8},
        "providers": {
            TRITON: {
                "features": list(triton_names),
                "base": 0.5,
                "learning_rate": 1.0,
                "trees": [_stump(steps, 0.5, 0.0, 1.0), _stump(tokens, 5.0, 0.0, 2.0)],
            },
            "vllm": {
                "features": list(feature_names("vllm")),
                "base": 1.0,
                "learning_rate": 1.0,
                "trees": [_stump(vendor_tokens, 5.0, 0.0, 2.0)],
            },
        },
    }


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "m.model.json"
    path.write_bytes(data if isinstance(data, bytes) else orjson.dumps(data))
    return path


def _broken(change) -> dict:
    data = copy.deepcopy(_model())
    change(data)
    return data


def _vllm_tree(field: str, change) -> dict:
    return _broken(lambda d: change(d["providers"]["vllm"]["trees"][0][field]))


BAD_FILES = {
    "not json": b"{not json",
    "a list": orjson.dumps([1, 2]),
    "schema": _broken(lambda d: d.update(schema_version=99)),
    "features version": _broken(lambda d: d.update(features_version=FEATURES_VERSION + 1)),
    "no device": _broken(lambda d: d["metadata"].pop("device_name")),
    "feature names": _broken(lambda d: d["providers"][TRITON]["features"].reverse()),
    "no trees": _broken(lambda d: d["providers"]["vllm"].update(trees=[])),
    "nan leaf": _vllm_tree("value", lambda v: v.__setitem__(1, math.nan)),
    "cycle": _vllm_tree("left", lambda v: v.__setitem__(0, 0)),
    "child outside": _vllm_tree("right", lambda v: v.__setitem__(0, 9)),
    "feature outside": _vllm_tree("feature", lambda v: v.__setitem__(0, 99)),
    "float child": _vllm_tree("left", lambda v: v.__setitem__(0, 1.0)),
    "short list": _vllm_tree("value", lambda v: v.pop()),
    "bad base": _broken(lambda d: d["providers"]["vllm"].update(base="1")),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_warns_and_loads_as_none(tmp_path, name):
    path = _write(tmp_path, BAD_FILES[name])
    with pytest.warns(RopeTableWarning, match="not used"):
        assert PerfModel.load(path) is None


def test_a_missing_file_warns_and_loads_as_none(tmp_path):
    with pytest.warns(RopeTableWarning, match="not used"):
        assert PerfModel.load(tmp_path / "absent.model.json") is None


def test_a_bad_model_raises_when_built_directly():
    with pytest.raises(PerfModelError, match="features_version"):
        PerfModel(BAD_FILES["features version"])


def test_a_valid_file_loads_without_warning(tmp_path):
    path = _write(tmp_path, _model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PerfModel.load(path)
    assert model is not None and model.providers == ("triton", "vllm")


def test_the_stumps_evaluate_as_documented():
    model = PerfModel(_model())
    spec = SPECS[0]
    # vllm: log_tokens <= 5 (few tokens) -> exp(1 + 0), else exp(1 + 2).
    assert model.predict_us("vllm", spec, 8) == pytest.approx(math.e)
    assert model.predict_us("vllm", spec, 1024) == pytest.approx(math.exp(3))
    one_step = {"block_t": 1, "block_h": 1, "head_split": 64, "num_warps": 4, "num_stages": 1}
    two_steps = dict(one_step, head_split=16)
    assert model.predict_us(TRITON, spec, 8, one_step) == pytest.approx(math.exp(0.5))
    assert model.predict_us(TRITON, spec, 8, two_steps) == pytest.approx(math.exp(1.5))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_rank_returns_valid_configs_in_predicted_order(spec):
    model = PerfModel.load(SHIPPED) if SHIPPED.exists() else PerfModel(_model())
    ranked = model.rank_configs(TRITON, spec, 777)
    assert ranked and len(ranked) == len(triton_candidates(spec))
    assert all(not config_problems(spec, c) for c in ranked)
    times = model.predict_configs(TRITON, spec, 777, ranked)
    assert all(a <= b for a, b in itertools.pairwise(times))
    assert model.rank_configs(TRITON, spec, 777, 5) == ranked[:5]


def test_predictions_are_deterministic(tmp_path):
    path = _write(tmp_path, _model())
    first, second = PerfModel.load(path), PerfModel.load(path)
    for spec in SPECS:
        for tokens in (1, 33, 4097):
            assert first.rank_configs(TRITON, spec, tokens, 8) == second.rank_configs(
                TRITON, spec, tokens, 8
            )
            assert first.best(spec, tokens, ["vllm", TRITON]) == second.best(
                spec, tokens, ["vllm", TRITON]
            )


def test_best_skips_providers_the_caller_left_out():
    model = PerfModel(_model())
    spec = SPECS[0]
    assert model.best(spec, 8, ["vllm"]).provider == "vllm"
    assert model.best(spec, 8, ["flashinfer"]) is None
    pick = model.best(spec, 8, ["vllm", TRITON])
    assert pick.provider == TRITON and not config_problems(spec, pick.config)


def test_between_buckets_keeps_a_neighbour_unless_the_model_beats_it_by_the_margin():
    model = PerfModel(_model())
    spec = SPECS[0]  # 40 one-head blocks: head_split 64 is one step, 16 is three
    slow = {"block_t": 1, "block_h": 1, "head_split": 16, "num_warps": 4, "num_stages": 1}
    choice = choose_between_buckets(model, spec, 8, [(TRITON, slow)], [TRITON, "vllm"])
    assert choice.provider == TRITON and choice.config != slow  # predicted e^0.5 < e^1.5
    kept = choose_between_buckets(
        model, spec, 8, [(TRITON, slow)], [TRITON, "vllm"], margin=math.e * 1.01
    )
    assert kept.config == slow
    invalid = dict(slow, block_h=32, num_warps=1, block_t=64)
    assert config_problems(spec, invalid)
    only_model = choose_between_buckets(model, spec, 8, [(TRITON, invalid)], [TRITON])
    assert only_model is not None and not config_problems(spec, only_model.config)


def test_features_match_their_names():
    for provider in ("vllm", TRITON):
        config = {"block_t": 2, "block_h": 4, "head_split": 2, "num_warps": 2, "num_stages": 3}
        x = features(provider, SPECS[1], 5, config, sm_count=132)
        assert len(x) == len(feature_names(provider)) and all(map(math.isfinite, x))


def test_features_are_the_definitions_models_were_fit_on():
    """Features version 2, pinned: a changed definition must bump FEATURES_VERSION (and refit),
    never change what a shipped model reads."""
    assert FEATURES_VERSION == 2
    config = {"block_t": 2, "block_h": 4, "head_split": 2, "num_warps": 2, "num_stages": 3}
    call = [19.521690157220196, 11.156250521031495, 2.772588722239781, 1.0986122886681098,
            4.564348191467836, 1.0, 1.0, 1.0]  # fmt: skip
    assert features("vllm", SPECS[1], 70000, sm_count=132) == call
    assert features(TRITON, SPECS[1], 70000, config, sm_count=132) == [
        *call, 11.156250521031495, 2.8077126956453986, 0.6931471805599453, 7.6246189861593985,
        2.0794415416798357, -0.2876820724517809, 2.0794415416798357, 0.6931471805599453,
        0.1206857142857143, 13.531404492242013, 0.0, 1.0, 0.0, 0.0, 1.0, 54.81129729488296,
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_the_shipped_model_is_valid(name):
    path = SHIPPED.parent / model_file_name(name)
    validate_model(orjson.loads(path.read_bytes()))


def test_fit_save_load_round_trip(tmp_path):
    pytest.importorskip("sklearn")
    from autotune.perf_model_fit import Measurement, fit_model, read_rows, write_model, write_rows

    rows = []
    for spec in SPECS[:2]:
        for tokens in (1, 64, 4096):
            rows.append(Measurement(spec.key, tokens, "vllm", None, 2.0 + tokens / 500))
            for i, config in enumerate(triton_candidates(spec)[:12]):
                rows.append(Measurement(spec.key, tokens, TRITON, config, 1.0 + i + tokens / 700))
    csv_path = tmp_path / "rows.csv"
    write_rows(csv_path, rows)
    assert read_rows(csv_path) == rows
    data = fit_model(rows, {"device_name": "Test GPU", "sm_count": 8})
    path = write_model(tmp_path / model_file_name("Test GPU"), data)
    assert path.name == "Test_GPU.model.json"
    loaded = PerfModel.load(path)
    fitted = PerfModel(data)
    for r in rows[::5]:
        assert loaded.predict_us(r.provider, r.spec, r.tokens, r.config) == fitted.predict_us(
            r.provider, r.spec, r.tokens, r.config
        )
    # The trees learnt the rows: in-sample error small against their 1..13 us spread.
    errors = [
        abs(math.log(fitted.predict_us(r.provider, r.spec, r.tokens, r.config) / r.median_us))
        for r in rows
    ]
    assert max(errors) < 0.2


def test_exported_trees_match_scikit_learn(tmp_path):
    """The torch evaluation reproduces GradientBoostingRegressor.predict on the same rows."""
    sklearn = pytest.importorskip("sklearn.ensemble")
    import numpy as np

    from autotune.perf_model_fit import GBT_PARAMS, _export_forest

    spec = SPECS[1]
    configs = triton_candidates(spec)[:40]
    x = np.array(
        [features(TRITON, spec, 100 + 7 * i, c, sm_count=132) for i, c in enumerate(configs)]
    )
    y = np.log(1.0 + np.arange(len(configs)) % 7)
    gbt = sklearn.GradientBoostingRegressor(**GBT_PARAMS).fit(x, y)
    data = _model()
    data["metadata"]["sm_count"] = 132  # as the features above
    data["providers"] = {TRITON: {"features": list(feature_names(TRITON)), **_export_forest(gbt)}}
    model = PerfModel(data)
    ours = [math.log(model.predict_us(TRITON, spec, 100 + 7 * i, c)) for i, c in enumerate(configs)]
    # Leaf values are stored to 7 significant digits; every split is reproduced exactly.
    assert ours == pytest.approx(gbt.predict(x).tolist(), abs=1e-6)


@pytest.mark.slow
def test_unseen_shapes_smoke_runs_on_the_cpu(tmp_path):
    """benchmarks/unseen_shapes.py --cpu-smoke: correctness gate, timing, the model's pick."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "unseen_shapes.py"), "--cpu-smoke"],
        check=True, env=env, cwd=root, capture_output=True, timeout=600,
    )  # fmt: skip
    text = (tmp_path / "unseen_shapes_cpu_smoke.txt").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    if SHIPPED.exists():  # the model's pick was bound, checked and timed
        assert all(line.split("|")[6].strip() != "-" for line in rows)
