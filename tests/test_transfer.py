"""Transfer to a GPU nobody measured: the rule (kernels.transfer) on fabricated metadata, the
metadata a device reports, and select_rope on the CPU made to report a fabricated GPU
(conftest.GPUS): which device's table and model it uses, what explain() and the warning say,
and what a GPU of another architecture gets."""

import importlib
import math
import shutil
import types
import warnings

import pytest
import torch
from conftest import (
    FILE,
    GPUS,
    ROOT,
    entry,
    make_table,
    perf_model_data,
    put,
    put_device_model,
    put_device_table,
    put_model,
)

import kernels.perf_model as perf_model_mod
import kernels.table as table_mod
from kernels import RopeSpec, RopeTableWarning, select_rope
from kernels import _lookup as lookup_mod
from kernels.perf_model import PerfModel, model_file_name
from kernels.table import device_table_name, read_table, shipped_config_dir
from kernels.transfer import (
    TRANSFER_ENV,
    DeviceTraits,
    choose_device,
    device_distance,
    transfer_enabled,
)

SPEC = RopeSpec(64, 32, 4, 2, True, torch.float32)


def traits(name: str, **changes) -> DeviceTraits:
    return DeviceTraits.from_metadata({**GPUS[name], **changes})


def chosen(this: str, *others: str) -> str | None:
    choice = choose_device(traits(this), [traits(o) for o in others])
    return None if choice.device is None else choice.device.name


# -- the rule ------------------------------------------------------------------------------------


def test_traits_from_metadata():
    h100 = traits("H100")
    assert h100.capability == (9, 0) and h100.sm_count == 132
    assert h100.bandwidth_gb_s == 3350.0 and not h100.bandwidth_measured
    assert h100.l2_cache_bytes == 50 << 20
    assert traits("B200").capability == (10, 0)
    # Old headers (no L2, no bandwidth), a CPU, ill-typed values: unknown, never an error.
    old = DeviceTraits.from_metadata({"device_name": "NVIDIA H200", "compute_capability": "9.0",
                                      "sm_count": 132})  # fmt: skip
    assert (old.l2_cache_bytes, old.bandwidth_gb_s) == (None, None)
    cpu = DeviceTraits.from_metadata({"device_name": "CPU x86_64", "compute_capability": None})
    assert cpu.capability is None and cpu.capability_text == "none"
    bad = DeviceTraits.from_metadata({"device_name": "X", "compute_capability": "nine",
                                      "sm_count": True, "l2_cache_bytes": -1,
                                      "memory_bandwidth_gb_s": "fast"})  # fmt: skip
    assert (bad.capability, bad.sm_count, bad.l2_cache_bytes, bad.bandwidth_gb_s) == (None,) * 4
    # A measured copy bandwidth stands in for a missing theoretical one, marked as measured.
    copied = DeviceTraits.from_metadata({**GPUS["H200"], "memory_bandwidth_gb_s": None,
                                         "copy_bandwidth_gb_s": 4270.0})  # fmt: skip
    assert copied.bandwidth_gb_s == 4270.0 and copied.bandwidth_measured


def test_distance_is_the_sum_of_log_ratios():
    expected = abs(math.log(3350 / 4800)) + abs(math.log(50 / 60))  # same SM count
    assert device_distance(traits("H100"), traits("H200")) == pytest.approx(expected)
    assert device_distance(traits("H200"), traits("H100")) == pytest.approx(expected)
    assert device_distance(traits("H100"), traits("H100")) == 0.0
    # What either device does not report counts log 2; so do bandwidths of two kinds.
    unknown = traits("H200", l2_cache_bytes=None)
    assert device_distance(traits("H100"), unknown) == pytest.approx(
        abs(math.log(3350 / 4800)) + math.log(2)
    )
    measured = traits("H200", memory_bandwidth_gb_s=None, copy_bandwidth_gb_s=3350.0)
    assert device_distance(traits("H100"), measured) == pytest.approx(
        math.log(2) + abs(math.log(50 / 60))
    )


def test_same_compute_capability_first():
    choice = choose_device(traits("H100"), [traits("H200")])
    assert choice.device.name == "NVIDIA H200"
    assert choice.why.startswith("same compute capability 9.0, nearest in SM count")
    assert choice.distance == pytest.approx(device_distance(traits("H100"), traits("H200")))
    # The same capability beats a nearer device of the same major: an 8.9 table serves an
    # 8.9 GPU even where an 8.6 one has its very figures.
    twin = traits("L40S", device_name="8.6 twin", compute_capability="8.6")
    far = traits("A10G", device_name="far 8.9", compute_capability="8.9")
    assert choose_device(traits("L40S"), [twin, far]).device.name == "far 8.9"


def test_nearest_within_a_tier():
    # An H100 PCIe (114 SMs, less bandwidth) is nearer the H100 SXM than the H200.
    assert chosen("H100 PCIe", "H200", "H100") == "NVIDIA H100 80GB HBM3"
    assert chosen("H100", "H200", "H100 PCIe") == "NVIDIA H200"
    # A device that reports nothing pays log 2 per quantity: the known near one wins.
    blank = DeviceTraits("blank", (9, 0))
    assert choose_device(traits("H100"), [blank, traits("H200")]).device.name == "NVIDIA H200"
    # Equal distances: the name first in sorted order, whatever the candidates' order.
    a, b = traits("H200", device_name="B"), traits("H200", device_name="A")
    assert choose_device(traits("H100"), [a, b]).device.name == "A"


def test_another_architecture_gets_no_transfer_across_majors():
    # A100 (sm_80), L40S (sm_89), B200 (sm_100) with only the H200's data: the default.
    for name in ("A100", "L40S", "B200"):
        choice = choose_device(traits(name), [traits("H200")])
        assert choice.device is None
        assert choice.why == (
            f"not transferred across architectures: {GPUS[name]['compute_capability']} here, "
            "data only of NVIDIA H200 (9.0)"
        )
    # Within a major it transfers: the L40S from an A100's table, the A100 from an L40S's.
    choice = choose_device(traits("L40S"), [traits("H200"), traits("A100")])
    assert choice.device.name == "NVIDIA A100-SXM4-80GB"
    assert choice.why.startswith("same architecture 8.x, nearest")
    assert chosen("A100", "L40S", "B200") == "NVIDIA L40S"
    assert chosen("B200", "H200", "A100") is None


def test_never_between_a_cpu_and_a_gpu():
    cpu = DeviceTraits.from_metadata({"device_name": "CPU x86_64", "compute_capability": None})
    other_cpu = DeviceTraits.from_metadata({"device_name": "CPU aarch64"})
    assert choose_device(cpu, [traits("H200"), other_cpu]).device is None
    choice = choose_device(traits("H100"), [cpu, other_cpu])
    assert choice.device is None and choice.why == "no other GPU's data found"


def test_own_name_left_out_and_the_first_of_a_name_stands():
    assert chosen("H100", "H100") is None
    near = traits("H200", sm_count=132)
    far = traits("H200", sm_count=13)
    choice = choose_device(traits("H100"), [near, far])
    assert choice.device is near


def test_transfer_switch(monkeypatch):
    monkeypatch.delenv(TRANSFER_ENV, raising=False)
    assert transfer_enabled() and transfer_enabled(True) and not transfer_enabled(False)
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(TRANSFER_ENV, off)
        assert not transfer_enabled() and transfer_enabled(True)
    monkeypatch.setenv(TRANSFER_ENV, "1")
    assert transfer_enabled()


# -- what a device reports -----------------------------------------------------------------------


def test_hardware_metadata_of_a_cuda_device(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA Test", major=9, minor=0,
                                  multi_processor_count=132, L2_cache_size=50 << 20,
                                  memory_clock_rate=2_619_000, memory_bus_width=5120)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    metadata = table_mod.hardware_metadata("cuda:0")
    # Double data rate: 2 * 2619 MHz * 5120 bits / 8 = 3352.3 GB/s.
    assert metadata == {"device_name": "NVIDIA Test", "compute_capability": "9.0",
                        "sm_count": 132, "l2_cache_bytes": 50 << 20,
                        "memory_bandwidth_gb_s": 3352.3}  # fmt: skip
    # A torch or driver that does not report the memory clock (or reports 0): unknown.
    del props.memory_clock_rate
    props.L2_cache_size = 0
    metadata = table_mod.hardware_metadata("cuda:0")
    assert metadata["memory_bandwidth_gb_s"] is None and metadata["l2_cache_bytes"] is None
    full = table_mod.device_metadata("cuda:0")
    assert full["device_name"] == "NVIDIA Test" and {"versions", "updated"} <= set(full)


def test_hardware_metadata_of_the_cpu():
    metadata = table_mod.hardware_metadata("cpu")
    assert metadata["device_name"].startswith("CPU ")
    assert all(metadata[k] is None for k in metadata if k != "device_name")
    assert DeviceTraits.from_metadata(metadata).capability is None


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_the_shipped_tables_say_what_decides_a_transfer(name):
    table = read_table(shipped_config_dir() / device_table_name(name))
    shipped = DeviceTraits.from_metadata(table["metadata"])
    assert shipped.capability == (9, 0) and shipped.sm_count == 132
    assert shipped.l2_cache_bytes and shipped.bandwidth_gb_s
    model = PerfModel.load(shipped_config_dir() / model_file_name(name))
    assert DeviceTraits.from_metadata(model.metadata) == shipped


# -- select_rope on a fabricated GPU ---------------------------------------------------------------


def select(**kwargs):
    s = SPEC
    return select_rope(s.head_size, s.rotary_dim, s.num_heads, s.num_kv_heads, s.is_neox,
                       s.dtype, "cpu", **kwargs)  # fmt: skip


def selected(**kwargs):
    """(selector, RopeTableWarning messages) of one select_rope call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rope = select(**kwargs)
    return rope, [str(w.message) for w in caught if issubclass(w.category, RopeTableWarning)]


def test_a_gpu_without_a_table_uses_the_nearest_devices_table(dirs, fake_gpu, monkeypatch):
    fake_gpu("H100")
    path = put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("torch")}})
    rope, messages = selected()
    assert rope.source == path and rope.spec_key == SPEC.key
    explained = rope.explain(16)
    assert explained.provider == "torch"
    assert (
        f"entries.graph.{SPEC.key}.16 (exact spec; table of NVIDIA H200 transferred: same "
        "compute capability 9.0, nearest in SM count, memory bandwidth and L2 size at distance "
    ) in explained.why
    # One warning per process: no table here, whose data, how to tune in one command.
    assert len(messages) == 1
    with warnings.catch_warnings(record=True) as caught:  # it names select_rope's caller
        warnings.simplefilter("always")
        monkeypatch.setattr(lookup_mod, "_warned", set())
        select()
    assert [w.filename for w in caught] == [__file__]
    assert messages[0].startswith(
        "rope-autotune: no tuning table for NVIDIA H100 80GB HBM3 (looked for "
        "NVIDIA_H100_80GB_HBM3.json); using the table of NVIDIA H200 (same compute capability "
        "9.0"
    )
    assert messages[0].endswith("Tune this device in one command: python -m autotune --device cpu")
    assert selected()[1] == []
    # A spec the transferred table lacks: its nearest spec there, as in an own table.
    other = select_rope(64, 32, 8, 2, True, torch.float32, "cpu")
    assert other.spec_key == SPEC.key and "nearest spec to" in other.explain(16).why


def test_the_devices_own_table_and_model_win(dirs, fake_gpu):
    fake_gpu("H100")
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("torch")}})
    put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    own = put_device_table(dirs["user"], "H100", {SPEC.key: {"16": entry("triton")}})
    put_device_model(dirs["user"], "H100", torch_log_us=1.0, triton_log_us=5.0)
    rope, messages = selected()
    assert rope.source == own and messages == []
    assert "transferred" not in rope.explain(16).why
    # Its own model alone also wins over the H200's table: a spec it lacks is predicted.
    own.unlink()
    rope, messages = selected()
    assert rope.source.name == "NVIDIA_H100_80GB_HBM3.model.json" and messages == []
    assert rope.explain(16).provider == "torch" and "transferred" not in rope.explain(16).why


@pytest.mark.parametrize(
    ("gpu", "source"),
    [("H100", "NVIDIA_H100_80GB_HBM3"), ("H100 PCIe", "NVIDIA_H100_80GB_HBM3"),
     ("H200", "NVIDIA_H200")],
)  # fmt: skip
def test_the_shipped_tables_serve_each_hopper_gpu_from_the_nearest(dirs, fake_gpu, gpu, source):
    """With the tables and models as shipped, an H100 PCIe (fewer SMs, less bandwidth) takes
    the H100's data, not the H200's (here its model: the spec is in no table)."""
    for path in shipped_config_dir().glob("*.json"):
        shutil.copy2(path, dirs["shipped"] / path.name)
    fake_gpu(gpu)
    rope, _ = selected()
    assert rope.source.name.split(".")[0] == source
    assert ("transferred" in rope.explain(16).why) == (gpu == "H100 PCIe")


# Rotated bytes per head row: 64 (rotary 16 in fp32) in the own model's shapes, 32 (rotary 8)
# in the H200's too.
WIDE, NARROW = (
    RopeSpec(64, 16, 4, 2, True, torch.float32),
    RopeSpec(64, 8, 4, 2, True, torch.float32),
)


def test_a_model_covers_the_shapes_it_was_fit_on():
    data = perf_model_data(1.0, 1.0)
    assert PerfModel(data).uncovered(NARROW) == ()  # no shapes named: nothing to say
    data["fit"] = {"specs": [WIDE.key, SPEC.key, "not a spec key"]}
    model = PerfModel(data)
    assert model.uncovered(NARROW) == ("log_row_bytes",)
    assert model.uncovered(WIDE) == () and model.uncovered(SPEC) == ()
    # Between the shapes fit on is inside; GPT-J and fp16 were never seen.
    assert model.uncovered(RopeSpec(64, 24, 4, 2, True, torch.float32)) == ()
    assert model.uncovered(RopeSpec(64, 32, 4, 2, False, torch.float16)) == ("gptj", "float16")


@pytest.mark.parametrize("transfer", [True, False])
def test_a_spec_unlike_the_own_models_shapes_takes_a_model_that_covers_it(dirs, fake_gpu, transfer):
    fake_gpu("H100")
    put_device_table(dirs["shipped"], "H100", {WIDE.key: {"16": entry("triton")}})
    own = put_device_model(dirs["shipped"], "H100", 5.0, 1.0, fit_specs=[WIDE.key])
    other = put_device_model(dirs["shipped"], "H200", 1.0, 5.0, fit_specs=[WIDE.key, NARROW.key])

    def select(spec):
        return select_rope(spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads,
                           spec.is_neox, spec.dtype, "cpu", transfer=transfer)  # fmt: skip

    narrow = select(NARROW)
    if transfer:  # its own model would extrapolate: the H200's speaks for this spec
        assert narrow.source == other and narrow.explain(16).provider == "torch"
        assert (
            "model of NVIDIA H200 transferred for a shape unlike this device's model's: same "
            "compute capability 9.0"
        ) in narrow.explain(16).why
    else:
        assert narrow.source == own and narrow.explain(16).provider == "triton"
    # A spec like the own model's shapes keeps it (here: between tuned buckets of its table).
    assert "transferred" not in select(WIDE).explain(64).why
    # No model covers it: the own model, extrapolating, rather than none.
    wider_miss = RopeSpec(64, 4, 4, 2, True, torch.float32)
    assert select(wider_miss).source == own


def test_a_gpu_with_a_table_but_no_model_borrows_the_nearest_model(dirs, fake_gpu):
    fake_gpu("H100")
    own = put_device_table(dirs["user"], "H100", {SPEC.key: {"1": entry("torch"),
                                                             "4096": entry("torch")}})  # fmt: skip
    put_device_model(dirs["shipped"], "H200", torch_log_us=4.0, triton_log_us=1.0)
    rope, messages = selected()
    assert rope.source == own and messages == []  # it has a table: no warning
    assert rope.explain(1).provider == "torch" and "transferred" not in rope.explain(1).why
    between = rope.explain(64)
    assert between.provider == "triton"
    assert "between tuned buckets 1 and 4096, predicted by" in between.why
    assert "(model of NVIDIA H200 transferred: same compute capability 9.0" in between.why


def test_a_gpu_without_data_uses_the_nearest_model(dirs, fake_gpu):
    fake_gpu("H100 PCIe")
    path = put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    rope, messages = selected()
    assert rope.source == path
    explained = rope.explain(37)
    assert explained.provider == "triton"
    assert f"predicted by {path} (model of NVIDIA H200 transferred: same compute" in explained.why
    assert "using the model of NVIDIA H200" in messages[0]


def test_the_tuners_warm_start_model_transfers_only_when_asked(dirs, fake_gpu):
    fake_gpu("H100")
    put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    cpu = torch.device("cpu")  # reporting the H100's metadata
    assert perf_model_mod.find_model(None, cpu) is None
    model = perf_model_mod.find_model(None, cpu, transfer=True)
    assert model is not None and model.transfer.startswith("model of NVIDIA H200 transferred")
    fake_gpu("A100")  # another architecture: nothing transfers
    assert perf_model_mod.find_model(None, cpu, transfer=True) is None


def test_a_transferred_model_counts_this_devices_sms(monkeypatch):
    data = perf_model_data(torch_log_us=1.0, triton_log_us=1.0)
    data["metadata"] = {**data["metadata"], "sm_count": 132}
    model = PerfModel(data)
    moved = model.transferred(114, "model of X transferred: because")
    assert (moved.sm_count, moved.transfer) == (114, "model of X transferred: because")
    assert (model.sm_count, model.transfer) == (132, None)
    assert model.transferred(None, "why").sm_count == 132
    # The features of its predictions are computed with this device's SM count.
    seen = []
    real = perf_model_mod.features
    monkeypatch.setattr(perf_model_mod, "features", lambda *a, sm_count: seen.append(sm_count)
                        or real(*a, sm_count=sm_count))  # fmt: skip
    moved.predict_us("torch", SPEC, 64)
    model.predict_us("torch", SPEC, 64)
    assert seen == [114, 132]


def test_the_table_and_model_of_one_device_together(dirs, fake_gpu):
    fake_gpu("H100")
    graph = {SPEC.key: {"1": entry("torch"), "4096": entry("torch")}}
    table = put_device_table(dirs["shipped"], "H200", graph)
    put_device_model(dirs["shipped"], "H200", torch_log_us=4.0, triton_log_us=1.0)
    rope, messages = selected()
    assert rope.source == table
    assert "table of NVIDIA H200 transferred" in rope.explain(1).why
    assert "model of NVIDIA H200 transferred" in rope.explain(64).why
    assert len(messages) == 1 and "using the table and model of NVIDIA H200 (" in messages[0]


@pytest.mark.parametrize("gpu", ["A100", "L40S", "B200"])
def test_another_architecture_runs_the_default(dirs, fake_gpu, gpu):
    fake_gpu(gpu)
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("triton")}})
    put_device_model(dirs["shipped"], "H200", torch_log_us=1.0, triton_log_us=5.0)
    rope, messages = selected()
    assert rope.source is None
    explained = rope.explain(16)
    # The CPU's untuned fallback here (the Triton default on a real GPU).
    assert explained.why.startswith("fallback: no graph entry")
    not_used = (
        "other devices' data not used: not transferred across architectures: "
        f"{GPUS[gpu]['compute_capability']} here, data only of NVIDIA H200 (9.0)"
    )
    assert not_used in explained.why
    assert len(messages) == 1 and not_used in messages[0]
    assert "python -m autotune --device cpu" in messages[0]


def test_the_same_architecture_transfers(dirs, fake_gpu):
    fake_gpu("L40S")
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("triton")}})
    a100 = put_device_table(dirs["user"], "A100", {SPEC.key: {"16": entry("torch")}})
    rope, _ = selected()
    assert rope.source == a100
    assert "table of NVIDIA A100-SXM4-80GB transferred: same architecture 8.x" in (
        rope.explain(16).why
    )


def test_transfer_switched_off(dirs, fake_gpu, monkeypatch):
    fake_gpu("H100")
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("torch")}})
    put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    for kwargs in ({"transfer": False}, {}):
        if not kwargs:
            monkeypatch.setenv(TRANSFER_ENV, "off")
        rope, _ = selected(**kwargs)
        assert rope.source is None and rope.explain(16).why.startswith("fallback")
        assert "not used" not in rope.explain(16).why
    assert selected(transfer=True)[0].source is not None  # the argument over the variable


def test_table_dir_limits_the_candidates(dirs, fake_gpu, tmp_path):
    fake_gpu("H100")
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("torch")}})
    alone = tmp_path / "alone"
    alone.mkdir()
    assert selected(table_dir=alone)[0].source is None
    pcie = put_device_table(alone, "H100 PCIe", {SPEC.key: {"16": entry("torch")}})
    assert selected(table_dir=alone)[0].source == pcie
    # A table file named as table_dir is this device's by the caller's word, whoever measured it.
    assert selected(table_dir=pcie)[0].source == pcie
    # The directory of a named file that does not exist is searched for a transfer.
    assert selected(table_dir=alone / "NVIDIA_H100_80GB_HBM3.json")[0].source == pcie


def test_the_cpu_never_uses_a_gpu_table_and_a_gpu_never_a_cpu_table(dirs, fake_gpu):
    put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("triton")}})
    put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    rope, messages = selected()  # the real CPU
    assert rope.source is None and "not used" not in rope.explain(16).why
    assert len(messages) == 1 and "transferred" not in messages[0]
    # This CPU's table and model (written before faking), and a GPU that finds only them.
    put(dirs["shipped"], make_table({SPEC.key: {"16": entry("torch")}}))
    put_model(dirs["shipped"], perf_model_data(torch_log_us=5.0, triton_log_us=1.0))
    (dirs["shipped"] / "NVIDIA_H200.json").unlink()
    (dirs["shipped"] / "NVIDIA_H200.model.json").unlink()
    fake_gpu("H100")
    assert (dirs["shipped"] / FILE).exists()
    rope, _ = selected()
    assert rope.source is None and "no other GPU's data found" in rope.explain(16).why


def test_unreadable_candidates_are_skipped(dirs, fake_gpu):
    fake_gpu("H100")
    (dirs["env"] / "broken.json").write_text("{")
    (dirs["env"] / "list.json").write_text("[1]")
    (dirs["env"] / ".NVIDIA_H200.json.1234.tmp.json").write_text("{")
    path = put_device_table(dirs["shipped"], "H200", {SPEC.key: {"16": entry("torch")}})
    assert selected()[0].source == path


def test_the_benchmark_hides_this_devices_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # a script with dataclasses
    unseen = importlib.import_module("unseen_shapes")
    source, into = tmp_path / "source", tmp_path / "into"
    source.mkdir(), into.mkdir()
    for name in ("NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H100_80GB_HBM3.model.json",
                 "NVIDIA_H200.json", "NVIDIA_H200.model.json"):  # fmt: skip
        (source / name).write_text("{}")
    unseen.hide_own(source, "NVIDIA H100 80GB HBM3", into)
    assert sorted(p.name for p in into.iterdir()) == ["NVIDIA_H200.json", "NVIDIA_H200.model.json"]
    assert unseen.short_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert unseen.short_tag("NVIDIA H200") == "h200"
    assert unseen.DATA == {"own": (False, True), "transfer": (True, True), "default": (True, False)}


def test_the_benchmarks_model_is_the_one_select_rope_reads(dirs, fake_gpu, tmp_path, monkeypatch):
    """unseen_shapes.py times the model's own pick: with this device's files hidden, the nearest
    device's model (transfer on) or none (transfer off), as ``select_rope`` would read them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    unseen = importlib.import_module("unseen_shapes")
    fake_gpu("H100")
    path = put_device_model(dirs["shipped"], "H200", torch_log_us=5.0, triton_log_us=1.0)
    hidden = unseen.hide_own(dirs["shipped"], "NVIDIA H100 80GB HBM3", tmp_path)
    model = unseen.model_for((str(hidden), True), "cpu")
    assert model is not None and model.transfer.startswith("model of NVIDIA H200 transferred")
    assert unseen.model_for((str(hidden), False), "cpu") is None
    assert unseen.model_for((str(hidden), False), "cpu", str(path)).source == path
