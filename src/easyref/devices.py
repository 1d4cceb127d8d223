"""Where models run and in which precision: one rule for generation, serving and the benchmark.

Default device: the first CUDA GPU when there is one, else the CPU. Default dtype: bfloat16 on a GPU
that supports it (SDXL and Qwen2-VL both run safely in it; Qwen2-VL was trained in it), float16 on an
older GPU, float32 on the CPU. torch is imported only when a device is resolved, so argument checks
stay light.
"""

from __future__ import annotations

import glob
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DEVICE_NAME = re.compile(r"auto|cpu|mps|meta|(cuda|xpu)(:\d+)?")
# what a CUDA (or ROCm, or WSL) driver puts under /dev; without any of them torch cannot see a GPU
GPU_DRIVER_FILES = ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")
# what an Intel GPU driver puts under /dev (torch's xpu backend reads through it)
XPU_DRIVER_FILES = ("/dev/dri/renderD*",)
META_MESSAGE = "meta is a placeholder device with no data; use cpu or cuda"


class DeviceError(ValueError):
    """A device or dtype that does not exist here (one line)."""


def check_device_name(name: str | None) -> None:
    """The checks that need no torch (1.5 s to import): a device name torch knows, and for CUDA a GPU
    driver on this machine. `resolve_device` makes the full check once torch is loaded."""
    if name is None:
        return
    name = str(name)
    if not DEVICE_NAME.fullmatch(name):
        raise _unknown_device(name)
    kind = name.split(":", 1)[0]
    if kind == "meta":
        raise DeviceError(META_MESSAGE)
    if kind == "cuda" and not gpu_driver_present():
        raise _no_gpu(name)
    if kind == "mps" and not on_macos():
        raise _no_mps(name)
    if kind == "xpu" and not any(glob.glob(pattern) for pattern in XPU_DRIVER_FILES):
        raise _no_xpu(name)


def gpu_driver_present() -> bool:
    return any(glob.glob(pattern) for pattern in GPU_DRIVER_FILES)


def on_macos() -> bool:
    """MPS exists only there (torch says whether this Mac has it)."""
    return sys.platform == "darwin"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`None` or `auto`: CUDA when present, else the CPU; a named device must exist on this machine."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise _unknown_device(name) from None
    check = DEVICE_CHECKS.get(device.type)
    if check is None:  # a type torch names but nothing here runs on (hpu, ipu, vulkan, ...)
        raise _unknown_device(name)
    check(device, name)
    return device


def _check_cuda(device: torch.device, name) -> None:
    import torch

    if not torch.cuda.is_available():
        raise _no_gpu(name)
    _check_index(device, name, torch.cuda.device_count(), "CUDA")


def _check_mps(device: torch.device, name) -> None:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise _no_mps(name)


def _check_xpu(device: torch.device, name) -> None:
    import torch

    xpu = getattr(torch, "xpu", None)  # absent from older torch builds
    if xpu is None or not xpu.is_available():
        raise _no_xpu(name)
    _check_index(device, name, xpu.device_count(), "XPU")


def _check_meta(device: torch.device, name) -> None:
    raise DeviceError(META_MESSAGE)


def _check_index(device: torch.device, name, count: int, what: str) -> None:
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name}: this machine has {count} {what} device(s)")


DEVICE_CHECKS = {
    "cpu": lambda device, name: None,
    "cuda": _check_cuda,
    "mps": _check_mps,
    "xpu": _check_xpu,
    "meta": _check_meta,
}


def _unknown_device(name) -> DeviceError:
    return DeviceError(f"unknown device {str(name)!r} (use e.g. cpu, cuda, cuda:1)")


def _no_gpu(name) -> DeviceError:
    return DeviceError(f"device {name} asked for, but no CUDA GPU is available")


def _no_mps(name) -> DeviceError:
    return DeviceError(f"device {name} asked for, but MPS (Apple silicon under macOS) is not available here")


def _no_xpu(name) -> DeviceError:
    return DeviceError(f"device {name} asked for, but no Intel XPU is available")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise DeviceError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPE_NAMES)})")
    return resolved


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


# ---------------------------------------------------------------------------- fast CPU kernels
LOW_PRECISION_NAMES = ("bfloat16", "float16")


def cpu_has_fast_kernels(dtype: torch.dtype) -> bool:
    """Whether this CPU runs convolutions in `dtype` through oneDNN (mkldnn). float32 always does; bfloat16
    and float16 only where torch finds the instructions for them (bfloat16: AVX-512; float16: AVX-512-FP16
    or AMX). Without them torch falls back to `aten::_slow_conv2d_forward`, which in NCHW is up to two
    orders of magnitude slower than float32 (`benchmarks/cpu_dtype.py`)."""
    import torch

    if dtype == torch.float32:
        return True
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if probe is None or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a torch build without the probe
        return False


def is_low_precision(dtype) -> bool:
    return str(dtype).removeprefix("torch.") in LOW_PRECISION_NAMES


def fast_cpu_layout(device, dtype) -> bool:
    """Whether the UNet's and VAE's convolutions should run channels-last: on a CPU without fast kernels for
    their low-precision dtype, where torch's fallback convolution is 3 (UNet) to 33 (VAE) times faster
    channels-last than NCHW. Where oneDNN has the kernels (bfloat16 with AVX-512) channels-last gains
    nothing (256 px) or costs 45% (64 px), so the layout stays (`benchmarks/cpu_dtype.py`)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    on_cpu = str(device).split(":")[0] == "cpu"
    return on_cpu and is_low_precision(name) and not cpu_has_fast_kernels(getattr(torch, name))


def cpu_decode_upcast(device, dtype) -> bool:
    """Whether a VAE in `dtype` on `device` should decode in float32: where it runs channels-last for want of
    fast kernels (`fast_cpu_layout`), float32 decodes 4 to 5 times faster with oneDNN (`benchmarks/cpu_dtype.py`);
    where the kernels exist, the low-precision decode is twice as fast as float32's and stays."""
    return fast_cpu_layout(device, dtype)


def vae_decode_dtype(device, dtype, force_upcast: bool = True) -> str:
    """The dtype name a pipeline's VAE in `dtype` decodes in: float32 where diffusers' SDXL pipelines upcast it
    (float16 with the VAE's `force_upcast`) and where `cpu_decode_upcast` says so; else its own."""
    name = str(dtype).removeprefix("torch.")
    if (name == "float16" and force_upcast) or cpu_decode_upcast(device, dtype):
        return "float32"
    return name
