"""The once-per-process backend self-check (pinpoint_kernels.backends / self_check).

A broken backend is simulated by monkeypatching the cpu launchers (wrong values, or an
exception); dispatch must warn once, fall back to the reference, and give correct results.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import pinpoint_kernels as pk
from pinpoint_kernels import backends, cpu, self_check
from pinpoint_kernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
REAL = {op: getattr(cpu, op) for op in self_check.OPS}  # the healthy launchers, before any patch


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test starts with no remembered results, and leaves none behind (a result
    recorded against a monkeypatched launcher must not outlive the patch)."""
    monkeypatch.delenv("PINPOINT_BACKEND", raising=False)
    monkeypatch.delenv("PINPOINT_SELF_CHECK", raising=False)
    backends.reset_self_checks()
    yield
    backends.reset_self_checks()


def _wrong_attention(*args, **kwargs):
    return REAL["head_patched_attention"](*args, **kwargs) + 0.5


def _wrong_grad(dy, x, heads, head_dim, *, by):
    out = REAL["head_slice_grad"](dy, x, heads, head_dim, by=by)
    return out.flip(0)  # the right slices in the wrong order: a plausible indexing bug


def _wrong_apply(weight, slices, heads, head_dim, *, by, alpha):
    return REAL["head_slice_apply"](weight, slices, heads.flip(0), head_dim, by=by, alpha=alpha)


def _raises(*args, **kwargs):
    raise RuntimeError("kernel exploded")


BROKEN = {"head_patched_attention": _wrong_attention, "head_slice_grad": _wrong_grad,
          "head_slice_apply": _wrong_apply}


def _attention_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 6, 4, 16, generator=g)
    k = torch.randn(2, 6, 2, 16, generator=g)
    v = torch.randn(2, 6, 2, 16, generator=g)
    hm = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    patch = torch.randn(3, 6, 4, 16, generator=g)
    return (q, k, v, hm, patch), dict(kv_index=torch.tensor([0, 1, 0]))


def _call(op):
    """Run the public op on a small case; returns (got, want)."""
    if op == "head_patched_attention":
        args, kw = _attention_inputs()
        return pk.head_patched_attention(*args, **kw), ref.head_patched_attention(*args, **kw)
    if op == "head_slice_grad":
        dy, x = torch.randn(11, 4 * 8), torch.randn(11, 12)
        return pk.head_slice_grad(dy, x, [3, 1], 8), ref.head_slice_grad(dy, x, torch.tensor([3, 1]), 8)
    w = torch.randn(4 * 8, 12)
    sl = torch.randn(2, 8, 12)
    want = ref.head_slice_apply(w.clone(), sl, torch.tensor([3, 1]), 8)
    return pk.head_slice_apply(w, sl, [3, 1], 8), want


def _self_check_warnings(record):
    return [w for w in record if issubclass(w.category, backends.SelfCheckWarning)]


@pytest.mark.parametrize("op", self_check.OPS)
@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_broken_backend_warns_once_and_falls_back(monkeypatch, op, fault):
    monkeypatch.setattr(cpu, op, BROKEN[op] if fault == "wrong" else _raises)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            got, want = _call(op)
            torch.testing.assert_close(got, want)  # the reference ran, so results are right
            assert backends.resolve(op, CPU)[0] == "reference"
    found = _self_check_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    text = str(found[0].message)
    assert "backend 'cpu'" in text and op in text and "falling back to reference" in text
    assert ("kernel exploded" in text) if fault == "raises" else ("values wrong" in text), text


def test_broken_launcher_is_really_wrong_without_the_check(monkeypatch):
    """The env switch skips the check: the broken launcher then runs (so the tests above
    exercise a real fault, and PINPOINT_SELF_CHECK=0 really turns the check off)."""
    monkeypatch.setattr(cpu, "head_patched_attention", _wrong_attention)
    monkeypatch.setenv("PINPOINT_SELF_CHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.SelfCheckWarning)
        got, want = _call("head_patched_attention")
    assert backends.resolve("head_patched_attention", CPU)[0] == "cpu"
    assert (got - want).abs().max() > 0.4
    assert backends.self_check_results() == {}


def test_healthy_backend_is_checked_once_per_combination(monkeypatch):
    calls = []
    real = self_check.run
    monkeypatch.setattr(self_check, "run", lambda op, fn, dev, dt, hd=None: calls.append((op, dt, hd))
                        or real(op, fn, dev, dt, hd))
    for _ in range(4):
        assert backends.resolve("head_patched_attention", CPU, dtype=torch.bfloat16, head_dim=16)[0] == "cpu"
        _call("head_patched_attention")  # the public op (no dtype passed: every dtype, once)
    assert backends.resolve("head_patched_attention", CPU, dtype=torch.float32, head_dim=16)[0] == "cpu"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # once each, with or without dtype=
        assert calls.count(("head_patched_attention", dtype, 16)) == 1
    n = len(calls)
    for _ in range(3):
        _call("head_patched_attention")
    assert len(calls) == n
    results = backends.self_check_results()
    assert results[("head_patched_attention", "cpu", torch.bfloat16, "cpu", 16)] is None


def test_check_is_keyed_by_dtype(monkeypatch):
    """A kernel broken only in bf16 falls back for bf16 and keeps running fp32."""
    def bf16_broken(q, *args, **kwargs):
        out = REAL["head_patched_attention"](q, *args, **kwargs)
        return out * 2 if q.dtype == torch.bfloat16 else out

    monkeypatch.setattr(cpu, "head_patched_attention", bf16_broken)
    with pytest.warns(backends.SelfCheckWarning, match=r"bfloat16: SelfCheckMismatch"):
        assert backends.resolve("head_patched_attention", CPU, dtype=torch.bfloat16)[0] == "reference"
    assert backends.resolve("head_patched_attention", CPU, dtype=torch.float32)[0] == "cpu"


@pytest.mark.parametrize("how", ["argument", "env"])
def test_forced_broken_backend_raises(monkeypatch, how):
    monkeypatch.setattr(cpu, "head_slice_grad", _wrong_grad)
    if how == "env":
        monkeypatch.setenv("PINPOINT_BACKEND", "cpu")
    kw = {"backend": "cpu"} if how == "argument" else {}
    dy, x = torch.randn(5, 16), torch.randn(5, 7)
    for _ in range(2):  # the remembered failure raises again, without re-running the check
        with pytest.raises(RuntimeError, match=r"backend 'cpu' failed its self-check for head_slice_grad "
                                               r"on cpu tensors .*gradient by=rows.*will not run another backend"):
            pk.head_slice_grad(dy, x, [1], 8, **kw)


def test_forced_healthy_backend_is_checked(monkeypatch):
    monkeypatch.setenv("PINPOINT_BACKEND", "cpu")
    pk.head_slice_apply(torch.zeros(16, 3), torch.ones(1, 8, 3), [1], 8)
    assert ("head_slice_apply", "cpu", torch.float32, "cpu", None) in backends.self_check_results()


def test_reference_needs_no_check(monkeypatch):
    monkeypatch.setattr(self_check, "run", _raises)
    assert backends.resolve("head_slice_grad", CPU, "reference")[0] == "reference"
    assert backends.self_check_results() == {}


def test_meta_and_fake_tensors():
    """Meta: skipped and not remembered. FakeTensor mode: the check leaves the mode and runs
    on real tensors, once."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert backends.resolve("head_slice_grad", torch.device("meta"))[0] == "reference"
    assert backends.self_check_results() == {}
    with FakeTensorMode():
        name, _ = backends.resolve("head_slice_grad", CPU, dtype=torch.float32)
    assert name == "cpu"
    assert backends.self_check_results() == {("head_slice_grad", "cpu", torch.float32, "cpu", None): None}
    with FakeTensorMode():  # no dtype given: every float dtype is checked (and remembered) once
        backends.resolve("head_slice_grad", CPU)
    assert len(backends.self_check_results()) == 3


def test_runs_under_torch_compile_fullgraph(monkeypatch):
    """A custom op that resolves its launcher in both its real and its fake kernel (as the
    public ops do) compiles with fullgraph=True; the check runs once, on real tensors."""
    lib = "pinpoint_self_check_test"

    @torch.library.custom_op(f"{lib}::grad", mutates_args=())
    def grad(dy: torch.Tensor, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        _, fn = backends.resolve("head_slice_grad", dy.device, dtype=dy.dtype)
        return fn(dy, x, heads, 8, by="rows")

    @grad.register_fake
    def _(dy, x, heads):
        backends.resolve("head_slice_grad", dy.device, dtype=dy.dtype)
        return dy.new_empty(heads.shape[0], 8, x.shape[1], dtype=torch.float32)

    monkeypatch.setattr(cpu, "head_slice_grad", _wrong_grad)
    f = torch.compile(lambda dy, x, h: grad(dy * 1, x, h), fullgraph=True, backend="aot_eager")
    dy, x, heads = torch.randn(9, 32), torch.randn(9, 5), torch.tensor([3, 0])
    with pytest.warns(backends.SelfCheckWarning, match="head_slice_grad"):
        got = f(dy, x, heads)
    torch.testing.assert_close(got, ref.head_slice_grad(dy, x, heads, 8))


def test_python_limit_check_names_the_limit(monkeypatch):
    """A head_dim over the CUDA kernel's limit is refused in Python, before any launch,
    with one message (the same one tests/gpu expects on a real GPU)."""
    monkeypatch.setattr(backends, "_usable", lambda name, device: None)
    monkeypatch.setattr(backends, "_backend_module", lambda name: pytest.fail("no launcher may load"))
    q = torch.randn(1, 2, 1, 300)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run head_patched_attention: head_dim 300 "
                                           r"exceeds its limit of 256 \(the CUDA kernels support head_dim "
                                           r"1\.\.256; use backend='triton' or 'reference'\)"):
        pk.head_patched_attention(q, q, q, backend="cuda")


def test_cases_catch_the_faults_they_target():
    """Each case fails a plausible bug and passes the reference itself."""
    for op in self_check.OPS:
        self_check.run(op, getattr(ref, op), CPU, torch.float32)
        with pytest.raises(self_check.SelfCheckMismatch):
            self_check.run(op, BROKEN[op], CPU, torch.float32)

    def unpadded(*args, key_padding_mask, **kw):  # ignores padding
        return cpu.head_patched_attention(*args, key_padding_mask=None, **kw)

    def unshared(*args, kv_index, **kw):  # ignores the K/V row map
        return cpu.head_patched_attention(*args, kv_index=torch.tensor([0, 1, 0]), **kw)

    for bug in (unpadded, unshared):
        with pytest.raises(self_check.SelfCheckMismatch):
            self_check.run("head_patched_attention", bug, CPU, torch.bfloat16)


def test_check_ignores_default_device_and_dtype():
    """The cases name their device and dtype, so a default-device context or a changed
    default dtype cannot turn a healthy backend into a failed one."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("error", backends.SelfCheckWarning)
            for op in self_check.OPS:
                assert backends.resolve(op, CPU)[0] == "cpu"
    finally:
        torch.set_default_dtype(old)
    assert len(backends.self_check_results()) == 9
    assert all(err is None for err in backends.self_check_results().values())
