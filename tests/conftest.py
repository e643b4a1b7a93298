"""Shared test setup and fixtures.

Without CUDA, Triton kernels run under the interpreter on the CPU; the variable must be set
before any kernel is defined, so it is set here, at collection start. Test modules import the
shared constants below with ``from conftest import ...``.
"""

import importlib.util
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.table as table_mod  # noqa: E402
from kernels import RopeSpec  # noqa: E402  (after TRITON_INTERPRET is set)
from kernels import _lookup as lookup_mod  # noqa: E402
from kernels.perf_model import (  # noqa: E402
    FEATURES_VERSION,
    SCHEMA_VERSION,
    feature_names,
    model_file_name,
)
from kernels.providers import TRITON, register_provider, unregister_provider  # noqa: E402
from kernels.table import device_metadata, device_table_name, write_table  # noqa: E402

# The repository root (scripts in benchmarks/, subprocesses that import the tree).
ROOT = Path(__file__).resolve().parent.parent

# The smallest spec the tuner tests run: 16-wide heads, 2 query heads, 1 key head, float32
# (the Triton interpreter has no bf16 math).
TINY = RopeSpec(16, 16, 2, 1, True, torch.float32)
# A GPT-J style, grouped-query spec with partial rotary, in bf16 (stored; math in float32).
TINY_GPTJ = RopeSpec(32, 16, 4, 2, False, torch.bfloat16)
# time_rope arguments for a quick CPU measurement: few rounds, no minimum round length.
QUICK = {"repeats": 3, "min_round_s": 0.0}
# The table file the tuner writes on this machine's CPU (``CPU <machine>.json``).
CPU_TABLE = device_table_name(f"CPU {platform.machine()}")


@pytest.fixture
def registered():
    """Register providers for one test: ``registered(provider)`` returns it; all are
    unregistered afterwards."""
    names = []

    def register(provider):
        register_provider(provider)
        names.append(provider.name)
        return provider

    yield register
    for name in names:
        unregister_provider(name)


@pytest.fixture(autouse=True)
def fresh_table_warnings(monkeypatch):
    """Each test sees its own first table warnings: ``select_rope`` warns once per process
    (``kernels._lookup.warn_once``), so a warning another test raised would hide it."""
    monkeypatch.setattr(lookup_mod, "_warned", set())


# -- tables for select_rope ----------------------------------------------------------------------

# This CPU's table file name (the one select_rope looks for on the CPU).
FILE = CPU_TABLE


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Three table sources in tmp_path: env, user, shipped. The real user dir is never read."""
    paths = {name: tmp_path / name for name in ("env", "user", "shipped")}
    for path in paths.values():
        path.mkdir()
    monkeypatch.setenv(table_mod.CONFIG_DIR_ENV, str(paths["env"]))
    monkeypatch.setattr(table_mod, "user_config_dir", lambda: paths["user"])
    monkeypatch.setattr(table_mod, "shipped_config_dir", lambda: paths["shipped"])
    return paths


def entry(
    provider: str = "torch", config: dict | None = None, median: float = 10.0, **others: float
) -> dict:
    """A table entry won by ``provider`` in ``median`` us; ``others`` are the other providers'
    recorded times (us)."""
    return {
        "provider": provider,
        "config": config or {},
        "median_us": median,
        "providers_us": {provider: median, **others},
    }


def make_table(graph: dict | None = None, eager: dict | None = None, versions=None) -> dict:
    metadata = device_metadata("cpu")
    if versions is not None:
        metadata["versions"] = {**metadata["versions"], **versions}
    return {
        "schema_version": table_mod.SCHEMA_VERSION,
        "metadata": metadata,
        "entries": {"graph": graph or {}, "eager": eager or {}},
    }


def put(directory, table: dict) -> object:
    return write_table(directory / FILE, table)


def _constant(value: float) -> dict:
    """One leaf: the provider's predicted log time is ``value`` for every call."""
    return {"feature": [-1], "threshold": [0.0], "left": [-1], "right": [-1], "value": [value]}


def perf_model_data(torch_log_us: float, triton_log_us: float) -> dict:
    """A valid performance model for this CPU predicting constant times (log us) for the
    ``torch`` and ``triton`` providers; Triton configs tie, so they rank in parameter order."""

    def part(name, log_us):
        names = feature_names(name)
        return {"features": list(names), "base": log_us, "learning_rate": 1.0,
                "trees": [_constant(0.0)]}  # fmt: skip

    return {
        "schema_version": SCHEMA_VERSION,
        "features_version": FEATURES_VERSION,
        "metadata": device_metadata("cpu"),
        "providers": {"torch": part("torch", torch_log_us), TRITON: part(TRITON, triton_log_us)},
    }


def put_model(directory, data) -> None:
    """Write a model file (its content, or bytes) as this CPU's model in ``directory``."""
    name = model_file_name(device_metadata("cpu")["device_name"])
    (directory / name).write_bytes(data if isinstance(data, bytes) else orjson.dumps(data))


# -- fabricated GPUs (the transfer rule, tested on the CPU) ----------------------------------------

# Metadata headers of GPUs as kernels.table.hardware_metadata would report them: compute
# capability and SM count as the vendors publish them, L2 and bandwidth in round figures.
# Fabricated for the tests; nothing here is a measurement.
GPUS = {
    "H200": {"device_name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
             "l2_cache_bytes": 60 << 20, "memory_bandwidth_gb_s": 4800.0},
    "H100": {"device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "sm_count": 132, "l2_cache_bytes": 50 << 20, "memory_bandwidth_gb_s": 3350.0},
    "H100 PCIe": {"device_name": "NVIDIA H100 PCIe", "compute_capability": "9.0",
                  "sm_count": 114, "l2_cache_bytes": 50 << 20, "memory_bandwidth_gb_s": 2000.0},
    "A100": {"device_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
             "sm_count": 108, "l2_cache_bytes": 40 << 20, "memory_bandwidth_gb_s": 2040.0},
    "A10G": {"device_name": "NVIDIA A10G", "compute_capability": "8.6", "sm_count": 80,
             "l2_cache_bytes": 6 << 20, "memory_bandwidth_gb_s": 600.0},
    "L40S": {"device_name": "NVIDIA L40S", "compute_capability": "8.9", "sm_count": 142,
             "l2_cache_bytes": 96 << 20, "memory_bandwidth_gb_s": 864.0},
    "B200": {"device_name": "NVIDIA B200", "compute_capability": "10.0", "sm_count": 148,
             "l2_cache_bytes": 126 << 20, "memory_bandwidth_gb_s": 8000.0},
}  # fmt: skip


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(name)`` makes this CPU report the ``GPUS[name]`` metadata (so select_rope on
    ``"cpu"`` looks for that GPU's table and model, and may transfer); the kernels still run on
    the CPU. Returns the metadata."""

    def fake(name: str) -> dict:
        metadata = dict(GPUS[name])
        monkeypatch.setattr(table_mod, "hardware_metadata", lambda device: dict(metadata))
        return metadata

    return fake


def gpu_metadata(name: str) -> dict:
    """A table's metadata header for the fabricated ``GPUS[name]``."""
    return {**GPUS[name], "versions": table_mod.library_versions(), "updated": "2026-01-01"}


def put_device_table(directory, name: str, graph: dict) -> Path:
    """Write the fabricated GPU ``name``'s table (graph entries ``graph``) in ``directory``."""
    metadata = gpu_metadata(name)
    table = {"schema_version": table_mod.SCHEMA_VERSION, "metadata": metadata,
             "entries": {"graph": graph, "eager": {}}}  # fmt: skip
    path = directory / device_table_name(metadata["device_name"])
    write_table(path, table)
    return path


def put_device_model(
    directory, name: str, torch_log_us: float, triton_log_us: float, fit_specs=None
) -> Path:
    """Write the fabricated GPU ``name``'s model (:func:`perf_model_data`) in ``directory``;
    ``fit_specs``: the spec keys it says it was fit on (none named: it covers every shape)."""
    data = perf_model_data(torch_log_us, triton_log_us)
    data["metadata"] = gpu_metadata(name)
    if fit_specs is not None:
        data["fit"] = {"specs": list(fit_specs)}
    path = directory / model_file_name(data["metadata"]["device_name"])
    path.write_bytes(orjson.dumps(data))
    return path


def case_spec(case) -> RopeSpec:
    """The spec of a test-matrix case (``tests/_reference64.Case``)."""
    return RopeSpec(case.head_size, case.rotary_dim, case.num_heads,
                    case.num_kv_heads or case.num_heads, case.is_neox, case.dtype)  # fmt: skip


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script, not a package module) for its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses look their module up there.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to, root included (chmod, or the immutable flag as root)."""
    import shutil
    import stat
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield path
        path.chmod(stat.S_IRWXU)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", path], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no directory is read-only here")
    yield path
    subprocess.run([chattr, "-i", path], check=True)


# -- vLLM's layers (optional: the modules that use these skip without vLLM) ----------------------


@pytest.fixture(scope="module")
def vllm_plugin():
    """The vLLM plugin registered for the requesting module's tests, unregistered after."""
    from kernels.integrations import vllm as plugin

    plugin.register()
    yield plugin
    plugin.unregister()


@pytest.fixture
def fresh_rope_layers(monkeypatch):
    """vLLM's ``get_rope`` memoizes layers process-wide: each test builds its own."""
    from vllm.model_executor.layers import rotary_embedding

    monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})


@contextmanager
def vllm_config(custom_ops=None, device="cpu", fusion_passes=()):
    """A vLLM config current in the block, yielded: ``custom_ops`` (vLLM's list of switches;
    None: vLLM's default) and the compile passes named in ``fusion_passes`` on."""
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config

    compilation = {} if custom_ops is None else {"custom_ops": list(custom_ops)}
    config = VllmConfig(
        device_config=DeviceConfig(device=device),
        compilation_config=CompilationConfig(**compilation),
    )
    for name in fusion_passes:  # set after construction: on the CPU vLLM turns them off
        setattr(config.compilation_config.pass_config, name, True)
    with set_current_vllm_config(config):
        yield config


def vllm_qk(num_tokens, num_heads, num_kv_heads, head_size, dtype, device, layout, generator):
    """Random query and key as vLLM's layers receive them; ``layout`` is "packed" ([T, H*D]),
    "heads" ([T, H, D]) or "fused" (column slices of one qkv tensor)."""
    q_width, k_width = num_heads * head_size, num_kv_heads * head_size
    if layout == "fused":
        qkv = torch.randn(num_tokens, q_width + 2 * k_width, generator=generator)
        qkv = qkv.to(device, dtype)
        return qkv[:, :q_width], qkv[:, q_width : q_width + k_width]
    query = torch.randn(num_tokens, q_width, generator=generator).to(device, dtype)
    key = torch.randn(num_tokens, k_width, generator=generator).to(device, dtype)
    if layout == "heads":
        query = query.view(num_tokens, num_heads, head_size)
        key = key.view(num_tokens, num_kv_heads, head_size)
    return query, key
