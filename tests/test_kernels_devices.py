"""``kernels.devices.normalize_device``: one canonical device, used by the selector, the vLLM
integration and the tuner's commands."""

import pytest
import torch

from autotune._device import DeviceError, resolve_device
from kernels import select_rope
from kernels.devices import DeviceUnavailableError, normalize_device


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA faked as available with two devices, the current one being cuda:1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


@pytest.mark.parametrize("name", ["cpu", "meta", torch.device("cpu")])
def test_other_device_types_pass_through(name):
    assert normalize_device(name) == torch.device(name)


def test_cuda_gets_the_current_index(two_gpus):
    assert normalize_device("cuda") == torch.device("cuda", 1)
    assert normalize_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert normalize_device("cuda:0") == torch.device("cuda", 0)


def test_an_index_past_the_count_is_unavailable(two_gpus):
    with pytest.raises(DeviceUnavailableError, match="there are only 2 CUDA devices"):
        normalize_device("cuda:2")


def test_cuda_without_cuda_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available here"):
        normalize_device("cuda:0")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", ""])
def test_a_bad_name_is_a_value_error_naming_it(name):
    with pytest.raises(ValueError, match=r"expected e\.g\. cuda:0 or cpu") as exc:
        normalize_device(name)
    assert not isinstance(exc.value, DeviceUnavailableError)


def test_the_selector_and_the_tuner_share_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available here"):
        select_rope(64, 64, 2, 2, True, torch.float32, "cuda")
    with pytest.raises(DeviceError, match="CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="expected a cuda or cpu device"):
        resolve_device("meta")  # the tuner times on cuda or cpu only


def test_the_vllm_integration_keys_its_selectors_by_the_normalized_device(two_gpus, monkeypatch):
    vllm = pytest.importorskip("kernels.integrations.vllm")
    from kernels.integrations import _vllm_calls

    built = []
    monkeypatch.setattr(_vllm_calls, "_ROPES", {})
    monkeypatch.setattr(_vllm_calls, "_build", lambda sig: built.append(sig))
    layer = torch.nn.Module()
    layer.cos_sin_cache = torch.zeros(8, 16)
    layer.head_size, layer.is_neox_style, layer.dtype = 16, True, torch.float32
    vllm.selector_for(layer, 2, device="cuda")
    vllm.selector_for(layer, 2)  # the cache's device
    assert [sig[6] for sig in built] == [torch.device("cuda", 1), torch.device("cpu")]
