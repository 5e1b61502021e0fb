"""The native build: _C always, _cuda whenever nvcc was available, neither tied to libtorch."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pinpoint_kernels import backends


def _linked_libraries(module) -> str:
    return subprocess.run(["ldd", module.__file__], capture_output=True, text=True).stdout


def test_cpu_extension_is_built_without_libtorch():
    mod = backends.native_module("_C")
    assert mod is not None, f"pinpoint_kernels._C did not import: {backends.native_import_error('_C')}"
    for fn in ("head_patched_attention", "grouped_atb", "head_slice_apply"):
        assert callable(getattr(mod, fn))
    if shutil.which("ldd"):
        libs = _linked_libraries(mod)
        assert "libtorch" not in libs and "libc10" not in libs
        assert "gomp" in libs or "omp" in libs  # OpenMP really linked


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("PINPOINT_BUILD_CUDA") == "0",
                    reason="nvcc not on PATH (or PINPOINT_BUILD_CUDA=0): the CUDA extension is optional")
def test_cuda_extension_was_compiled_when_nvcc_exists():
    mod = backends.native_module("_cuda")
    assert mod is not None, f"nvcc is on PATH but pinpoint_kernels._cuda did not import: {backends.native_import_error('_cuda')}"
    for fn in ("head_patched_attention", "grouped_atb", "head_slice_apply"):
        assert callable(getattr(mod, fn))
    if shutil.which("ldd"):
        libs = _linked_libraries(mod)
        assert "libtorch" not in libs and "libc10" not in libs
        assert "libcudart.so" not in libs  # the runtime is linked statically


def test_missing_backends_only_narrow_the_choice(monkeypatch):
    """Without _C / triton the package still imports and falls back to the reference."""
    import torch

    monkeypatch.setattr(backends, "native_module", lambda name: None)
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    monkeypatch.delenv("PINPOINT_BACKEND", raising=False)
    assert backends.available_backends("cpu") == ["reference"]
    assert backends.resolve("head_patched_attention", torch.device("cpu"))[0] == "reference"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run head_slice_grad: pinpoint_kernels._C is not built"):
        backends.resolve("head_slice_grad", torch.device("cpu"), "cpu")
    with pytest.raises(RuntimeError, match=r"triton is not installed"):
        backends.resolve("head_slice_grad", torch.device("cpu"), "triton")


def test_dispatch_order_and_per_op_limits_on_cuda(monkeypatch):
    """CUDA tensors: _cuda first, then Triton; a head_dim over the CUDA kernel's limit skips
    it, and forcing it then is a clear error. (Runs without a GPU: backends are faked.)"""
    import types

    import torch

    fake = types.SimpleNamespace(head_patched_attention=lambda *a, **k: None)
    monkeypatch.setattr(backends, "_usable", lambda name, device: None)
    monkeypatch.setattr(backends, "_backend_module", lambda name: fake)
    monkeypatch.delenv("PINPOINT_BACKEND", raising=False)
    dev = torch.device("cuda")
    assert backends.resolve("head_patched_attention", dev, head_dim=128)[0] == "cuda"
    assert backends.resolve("head_patched_attention", dev, head_dim=512)[0] == "triton"
    with pytest.raises(RuntimeError, match=r"head_dim 512 exceeds its limit of 256"):
        backends.resolve("head_patched_attention", dev, "cuda", head_dim=512)
