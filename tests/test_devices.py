"""One rule for the default device and precision (generate, serve and the benchmark share it)."""

from __future__ import annotations

import pytest
import torch

from easyref.devices import DeviceError, resolve_device, resolve_device_dtype, resolve_dtype


def test_defaults_on_this_machine():
    device, dtype = resolve_device_dtype()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.type == expected
    assert dtype == (torch.float32 if expected == "cpu" else resolve_dtype("auto", device))
    assert resolve_device("auto") == resolve_device(None)


def test_gpu_default_is_bfloat16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_named_dtypes_and_devices():
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("torch.float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.float64, torch.device("cpu")) == torch.float64
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "call, phrase",
    [
        (lambda: resolve_device("nonsense"), "unknown device 'nonsense'"),
        (lambda: resolve_dtype("float7", torch.device("cpu")), "unknown dtype 'float7'"),
        (lambda: resolve_dtype("Tensor", torch.device("cpu")), "unknown dtype 'Tensor'"),
    ],
)
def test_mistakes_are_one_line(call, phrase):
    with pytest.raises(DeviceError, match=phrase):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_device("cuda")
