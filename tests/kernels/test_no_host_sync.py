"""No host synchronisation in the hot path (issue 15, item 2), checked on the CPU.

A CUDA run would use ``torch.cuda.set_sync_debug_mode("error")``. Here a TorchDispatchMode
records every aten op a public call runs, including those inside the registered
``pinpoint::*`` ops (their eager bodies are re-run under the mode), and the test asserts
that none of them reads a tensor's values on the host (``_local_scalar_dense`` is what
``.item()``, ``int(t)`` and ``bool(t)`` dispatch to; ``nonzero`` and ``unique`` size their
output by values). Index values are read on the host only where that is free (CPU tensors,
see ``validation.values_on_host``); to run the path a CUDA tensor takes, the tests replace
that one predicate with "no".
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pinpoint_kernels as pk
from pinpoint_kernels import library
from pinpoint_kernels import validation as V
from pinpoint_kernels.head_slice_linear import SliceIndex

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

SYNCING = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::_unique", "aten::unique",
           "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::is_nonzero",
           "aten::equal", "aten::allclose")


class RecordOps(TorchDispatchMode):
    """Records the name of every op dispatched; steps into pinpoint's own ops."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.names.append(name)
        if name.startswith(f"{library.NAMESPACE}::"):
            with self:  # run the op's eager body with this mode still recording
                return library.IMPLEMENTATIONS[name.split("::")[1]](*args, **kwargs)
        return func(*args, **kwargs)

    def syncing(self) -> list[str]:
        return [n for n in self.names if n.startswith(SYNCING)]


@pytest.fixture
def device_path(monkeypatch):
    """Take the path of an accelerator tensor: index values are never read on the host."""
    monkeypatch.setattr(V, "values_on_host", lambda x: False)
    monkeypatch.delenv("PINPOINT_DEBUG_CHECKS", raising=False)


def _attention_args(g):
    q = torch.randn(3, 4, 4, 8, generator=g)
    k = torch.randn(2, 5, 2, 8, generator=g)
    hm = torch.rand(3, 4, generator=g) < 0.5
    patch = torch.randn(2, 4, 4, 8, generator=g)
    return (q, k, k.clone(), hm, patch), dict(kv_index=torch.tensor([1, 0, 1]), patch_index=torch.tensor([0, 1, 1]),
                                              key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


def _calls(g):
    """(name, thunk) for one call of each public op, indices built beforehand."""
    a, kw = _attention_args(g)
    rows, cols = SliceIndex([3, 1], 8, 4), SliceIndex([0, 2], 8, 4)
    x, w = torch.randn(2, 5, 12, generator=g, requires_grad=True), torch.randn(32, 12, generator=g)
    b = torch.randn(32, generator=g)
    d = torch.randn(2, 8, 12, generator=g, requires_grad=True)
    db = torch.randn(2, 8, generator=g, requires_grad=True)
    z, wo = torch.randn(5, 32, generator=g, requires_grad=True), torch.randn(12, 32, generator=g)
    do = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    return [
        ("head_patched_attention", lambda: pk.head_patched_attention(*a, **kw)),
        ("head_slice_grad (tensor heads)", lambda: pk.head_slice_grad(torch.randn(6, 32), torch.randn(6, 12),
                                                                       torch.tensor([3, 1]), 8)),
        ("head_slice_grad (SliceIndex)", lambda: pk.head_slice_grad(torch.randn(6, 12), torch.randn(6, 32), cols, 8,
                                                                     by="cols")),
        ("head_slice_apply", lambda: pk.head_slice_apply(w.clone(), torch.randn(2, 8, 12), rows, 8)),
        ("head_slice_linear rows fwd+bwd",
         lambda: pk.head_slice_linear(x, w, b, d, rows, delta_bias=db).sum().backward()),
        ("head_slice_linear cols fwd+bwd",
         lambda: pk.head_slice_linear(z, wo, None, do, cols, by="cols").sum().backward()),
        ("head_slice_linear conv1d no_grad",
         lambda: pk.head_slice_linear(x.detach(), w.t().contiguous(), b, d.detach(), rows, layout="conv1d")),
    ]


@pytest.mark.parametrize("which", range(7))
def test_public_call_reads_no_values_on_the_host(which, device_path):
    name, call = _calls(torch.Generator().manual_seed(which))[which]
    with RecordOps() as rec:
        call()
    assert rec.names, "the mode recorded nothing"
    assert any(n.startswith(f"{library.NAMESPACE}::") for n in rec.names), "no pinpoint op ran"
    assert rec.syncing() == [], f"{name} read values on the host: {rec.syncing()}"


def test_recorder_catches_a_host_read(device_path):
    """The check can fail: a value check left on the hot path is recorded."""
    with RecordOps() as rec:
        V.check_index_values("op", "idx", torch.tensor([0, 1]), upper=2, what="rows", on_host=True)
        bool((torch.tensor([1, 2]) > 1).any())
    assert "aten::_local_scalar_dense" in rec.syncing()


def test_device_path_checks_indices_on_the_device(device_path):
    """Without a host read, kv_index/patch_index are still range-checked, by device-side
    asserts (on the CPU they raise at once; on a GPU they stop the stream)."""
    a, kw = _attention_args(torch.Generator().manual_seed(0))
    with RecordOps() as rec:
        pk.head_patched_attention(*a, **kw)
    assert rec.names.count("aten::_assert_async") >= 2
    with pytest.raises(RuntimeError, match=r"kv_index has a value out of range for 2 K/V rows"):
        pk.head_patched_attention(*a, **{**kw, "kv_index": torch.tensor([0, 2, 1])})
    with pytest.raises(RuntimeError, match=r"heads must be distinct"):
        pk.head_slice_grad(torch.randn(6, 32), torch.randn(6, 12), torch.tensor([1, 1]), 8)


def test_debug_mode_restores_the_precise_host_checks(device_path, monkeypatch):
    monkeypatch.setenv("PINPOINT_DEBUG_CHECKS", "1")
    a, kw = _attention_args(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"kv_index\[1\] = 2 is out of range for 2 K/V rows"):
        pk.head_patched_attention(*a, **{**kw, "kv_index": torch.tensor([0, 2, 1])})


def test_slice_index_checks_once_on_the_host(device_path):
    """Building the index is where a bad head is caught with a precise error, on any device."""
    with pytest.raises(ValueError, match=r"heads\[1\] = 4 is out of range for 4 heads"):
        SliceIndex(torch.tensor([0, 4]), 8, 4)
    with pytest.raises(ValueError, match=r"heads must be distinct, got \[2, 2\]"):
        SliceIndex(torch.tensor([2, 2]), 8, 4)


def test_slice_index_must_match_the_projection():
    idx = SliceIndex([1], 8, 4)
    with pytest.raises(ValueError, match=r"the SliceIndex is for 4 heads of head_dim 8, but grad_out has 2"):
        pk.head_slice_grad(torch.randn(3, 16), torch.randn(3, 5), idx, 8)
    with pytest.raises(ValueError, match=r"the SliceIndex is for 4 heads of head_dim 8, but weight has 8"):
        pk.head_slice_apply(torch.randn(32, 5), torch.randn(1, 4, 5), idx, 4)
