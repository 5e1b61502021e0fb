"""Fused head-patched attention: the reference against torch SDPA and a naive loop, and every
CPU-side backend against the reference, on hypothesis-chosen shapes.

Tolerances:
* fp32: atol = rtol = 1e-5. Backends differ from the reference only in summation order
  over at most D products and Tk keys of O(1) values: errors are a few fp32 ulps (~1e-6).
* bf16 / fp16: both sides accumulate in fp32 and round once at the end, so they can differ
  by one ulp of the output when the fp32 values straddle a rounding boundary:
  rtol = 2**-7 (bf16 ulp) or 2**-10 (fp16 ulp) relative, plus a tiny atol for values near 0.
* Patched (masked) heads are a copy and a cast: compared exactly.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pinpoint_kernels as pk
from pinpoint_kernels import reference as ref

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=2**-7),
    torch.float16: dict(atol=1e-5, rtol=2**-10),
}
# Backends checked on CPU tensors here; Triton (interpreter) has its own, smaller suite.
CPU_BACKENDS = [b for b in ("cpu",) if b in pk.available_backends("cpu")]


def make_case(*, R, Rk, Tq, Tk, Hq, Hkv, D, dtype, pad, mask_mode, patch_mode, seed, shared_kv):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, Tq, Hq, D, generator=g).to(dtype)
    k = torch.randn(Rk, Tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Rk, Tk, Hkv, D, generator=g).to(dtype)
    kw: dict = {}
    kw["kv_index"] = torch.randint(0, Rk, (R,), generator=g) if shared_kv else None
    if pad != "none":
        lens = torch.randint(1, Tk + 1, (Rk,), generator=g)
        pos = torch.arange(Tk)[None, :]
        kpm = pos >= (Tk - lens[:, None]) if pad == "left" else pos < lens[:, None]
        kw["key_padding_mask"] = kpm
    head_mask = None
    if mask_mode == "random":
        head_mask = torch.rand(R, Hq, generator=g) < 0.4
    elif mask_mode == "all":
        head_mask = torch.ones(R, Hq, dtype=torch.bool)
    elif mask_mode == "none_set":
        head_mask = torch.zeros(R, Hq, dtype=torch.bool)
    patch = None
    if head_mask is not None:
        if patch_mode == "full":
            patch = torch.randn(R, Tq, Hq, D, generator=g).to(dtype)
        elif patch_mode == "indexed":
            patch = torch.randn(3, Tq, Hq, D, generator=g)  # fp32 patch into any dtype
            kw["patch_index"] = torch.randint(0, 3, (R,), generator=g)
        elif patch_mode == "mean":  # a per-head mean broadcast over rows and tokens
            patch = torch.randn(1, 1, Hq, D, generator=g).to(dtype).expand(1, Tq, Hq, D)
    return q, k, v, head_mask, patch, kw


def naive_attention(q, k, v, head_mask, patch, *, kv_index=None, patch_index=None,
                    key_padding_mask=None, scale=None, causal=True):
    """One (row, head, query) at a time, straight from the definition."""
    R, Tq, Hq, D = q.shape
    Rk, Tk, Hkv, _ = k.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(R, Tq, Hq, D, dtype=torch.float64)
    for r in range(R):
        kr = r if kv_index is None else int(kv_index[r])
        for h in range(Hq):
            if head_mask is not None and head_mask[r, h]:
                if patch is not None:
                    pr = int(patch_index[r]) if patch_index is not None else (r if patch.shape[0] == R else 0)
                    out[r, :, h] = patch[pr, :, h].double()
                continue
            kh = h // (Hq // Hkv)
            for i in range(Tq):
                keys = [j for j in range(Tk)
                        if (not causal or j <= Tk - Tq + i)
                        and (key_padding_mask is None or key_padding_mask[kr, j])]
                if not keys:
                    continue
                s = torch.stack([q[r, i, h].double() @ k[kr, j, kh].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[r, i, h] = sum(p[n] * v[kr, j, kh].double() for n, j in enumerate(keys))
    return out.reshape(R, Tq, Hq * D)


shapes = st.fixed_dictionaries({
    "R": st.integers(1, 4),
    "Rk": st.integers(1, 3),
    "Tq": st.integers(1, 9),
    "extra_keys": st.sampled_from([0, 0, 1, 4]),
    "Hkv": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 4]),
    "D": st.sampled_from([24, 64, 80, 128]),
    "pad": st.sampled_from(["none", "left", "right"]),
    "mask_mode": st.sampled_from(["absent", "none_set", "random", "all"]),
    "patch_mode": st.sampled_from(["zero", "full", "indexed", "mean"]),
    "shared_kv": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def build(p, dtype):
    R = p["R"]
    Rk = p["Rk"] if p["shared_kv"] else R
    return make_case(R=R, Rk=Rk, Tq=p["Tq"], Tk=p["Tq"] + p["extra_keys"], Hq=p["Hkv"] * p["group"],
                     Hkv=p["Hkv"], D=p["D"], dtype=dtype, pad=p["pad"],
                     mask_mode=None if p["mask_mode"] == "absent" else p["mask_mode"],
                     patch_mode=p["patch_mode"], seed=p["seed"], shared_kv=p["shared_kv"])


@settings(max_examples=40, deadline=None)
@given(p=shapes)
def test_reference_matches_naive_definition(p):
    q, k, v, hm, patch, kw = build(p, torch.float32)
    got = ref.head_patched_attention(q, k, v, hm, patch, **kw)
    want = naive_attention(q, k, v, hm, patch, **kw)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_reference_matches_torch_sdpa(group, pad):
    """No patches: the op is SDPA with GQA, a causal mask and key padding."""
    R, T, Hkv, D = 3, 7, 2, 24
    q, k, v, _, _, kw = make_case(R=R, Rk=R, Tq=T, Tk=T, Hq=Hkv * group, Hkv=Hkv, D=D,
                                  dtype=torch.float32, pad=pad, mask_mode=None, patch_mode="zero",
                                  seed=group, shared_kv=False)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(R, 1, T, T)
    if pad != "none":
        allowed = allowed & kw["key_padding_mask"][:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2), attn_mask=allowed)
    want = want.nan_to_num(0.0).transpose(1, 2).reshape(R, T, -1)  # fully masked queries -> 0
    keep = allowed.any(-1)[:, 0, :, None].expand_as(want)  # SDPA leaves those rows undefined
    got = ref.head_patched_attention(q, k, v, **kw)
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert torch.all(got[~keep] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@settings(max_examples=30, deadline=None)
@given(p=shapes)
def test_backend_matches_reference(backend, dtype, p):
    q, k, v, hm, patch, kw = build(p, dtype)
    want = ref.head_patched_attention(q, k, v, hm, patch, **kw)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    if hm is not None:  # patched heads: an exact copy of the patch (or zeros)
        D = q.shape[-1]
        sel = hm[:, None, :, None].expand(*hm.shape[:1], q.shape[1], hm.shape[1], D)
        assert torch.equal(got.view_as(q)[sel], want.view_as(q)[sel])


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_non_causal_and_custom_scale(backend):
    q, k, v, hm, patch, kw = make_case(R=2, Rk=2, Tq=3, Tk=5, Hq=4, Hkv=2, D=24, dtype=torch.float32,
                                       pad="right", mask_mode="random", patch_mode="full", seed=3,
                                       shared_kv=False)
    for causal in (False, True):
        got = pk.head_patched_attention(q, k, v, hm, patch, causal=causal, scale=0.3, backend=backend, **kw)
        want = naive_attention(q, k, v, hm, patch, causal=causal, scale=0.3, **kw)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_masked_heads_never_read_q_or_kv(backend):
    """A patched (row, head) must not depend on its q, nor on K/V that only it reads."""
    R, T, H, D = 3, 5, 4, 24
    q = torch.randn(R, T, H, D)
    k = torch.randn(2, T, 2, D)
    v = torch.randn(2, T, 2, D)
    hm = torch.zeros(R, H, dtype=torch.bool)
    hm[:, 2:] = True  # heads 2, 3 read K/V head 1: poison it and their queries
    q[:, :, 2:] = float("nan")
    k[:, :, 1] = float("nan")
    v[:, :, 1] = float("nan")
    patch = torch.randn(R, T, H, D)
    out = pk.head_patched_attention(q, k, v, hm, patch, kv_index=torch.tensor([0, 1, 0]), backend=backend)
    assert not out.isnan().any()
    assert torch.equal(out.view(R, T, H, D)[:, :, 2:], patch[:, :, 2:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_kv_rows_equal_expanded_kv(backend):
    """kv_index sharing gives exactly what copying K/V per row gives."""
    q, k, v, hm, patch, kw = make_case(R=5, Rk=2, Tq=6, Tk=6, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16,
                                       pad="left", mask_mode="random", patch_mode="full", seed=7,
                                       shared_kv=True)
    idx = kw["kv_index"]
    shared = pk.head_patched_attention(q, k, v, hm, patch, backend=backend, **kw)
    copied = pk.head_patched_attention(q, k[idx], v[idx], hm, patch,
                                       key_padding_mask=kw["key_padding_mask"][idx], backend=backend)
    assert torch.equal(shared, copied)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    """q/k/v straight out of a fused projection (non-contiguous views) need no copy."""
    R, T, H, D = 2, 7, 4, 24
    qkv = torch.randn(R, T, 3, H, D)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    want = ref.head_patched_attention(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(pk.head_patched_attention(q, k, v, backend=backend), want, **TOL[torch.float32])


def test_empty_inputs_return_empty():
    q = torch.randn(0, 3, 4, 8)
    k = torch.randn(0, 3, 2, 8)
    assert pk.head_patched_attention(q, k, k).shape == (0, 3, 32)


# --- bad input: one clear error each -------------------------------------------------------

def _ok():
    return torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D"),
    (lambda q, k, v: (q.double(), k, v), TypeError, r"q must be float32, bfloat16 or float16"),
    (lambda q, k, v: (q, k.half(), v), TypeError, r"share a dtype"),
    (lambda q, k, v: (q.int(), k, v), TypeError, r"q must be float32"),
    (lambda q, k, v: (q, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8)), ValueError, r"mismatched GQA: 4 query heads"),
    (lambda q, k, v: (q, torch.randn(2, 3, 2, 6), torch.randn(2, 3, 2, 6)), ValueError, r"head_dim 8 but k/v have head_dim 6"),
    (lambda q, k, v: (q, k, v[:, :2]), ValueError, r"same shape"),
    (lambda q, k, v: (torch.randn(2, 5, 4, 8), k, v), ValueError, r"5 tokens but k/v only 3"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"pass kv_index"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"k is on meta but q is on cpu"),
    (lambda q, k, v: ([1.0], k, v), TypeError, r"q must be a torch.Tensor"),
])
def test_bad_qkv(mutate, exc, match):
    with pytest.raises(exc, match=match):
        pk.head_patched_attention(*mutate(*_ok()))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(head_mask=torch.zeros(2, 3, dtype=torch.bool)), ValueError, r"head_mask must have shape \[R, Hq\] = \(2, 4\)"),
    (dict(head_mask=torch.zeros(2, 4)), TypeError, r"head_mask must be a bool tensor"),
    (dict(kv_index=torch.tensor([0, 2])), ValueError, r"kv_index\[1\] = 2 is out of range for 2 K/V rows"),
    (dict(kv_index=torch.tensor([0, -1])), ValueError, r"kv_index\[1\] = -1 is out of range"),
    (dict(kv_index=torch.tensor([0.0, 1.0])), TypeError, r"kv_index must be an int32/int64 tensor"),
    (dict(kv_index=torch.tensor([0])), ValueError, r"kv_index has 1 entries, expected 2"),
    (dict(patch=torch.zeros(2, 3, 4, 8)), ValueError, r"patch was given without head_mask"),
    (dict(head_mask=torch.ones(2, 4, dtype=torch.bool), patch=torch.zeros(3, 3, 4, 8)), ValueError, r"needs R = 2 or 1"),
    (dict(head_mask=torch.ones(2, 4, dtype=torch.bool), patch=torch.zeros(2, 3, 4, 7)), ValueError, r"patch must have shape"),
    (dict(head_mask=torch.ones(2, 4, dtype=torch.bool), patch=torch.zeros(3, 3, 4, 8),
          patch_index=torch.tensor([0, 3])), ValueError, r"patch_index\[1\] = 3 is out of range for 3 patch rows"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' cannot run head_patched_attention: .*CUDA tensors only"),
    (dict(backend="nope"), RuntimeError, r"unknown backend 'nope'"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pk.head_patched_attention(*_ok(), **kwargs)


def test_bad_forced_backend_env(monkeypatch):
    monkeypatch.setenv("PINPOINT_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"PINPOINT_BACKEND='gpu' is not one of"):
        pk.head_patched_attention(*_ok())


def test_forced_backend_env_is_used(monkeypatch):
    calls = []
    monkeypatch.setenv("PINPOINT_BACKEND", "reference")
    monkeypatch.setattr(ref, "head_patched_attention",
                        lambda *a, **k: calls.append(1) or torch.zeros(2, 3, 32))
    pk.head_patched_attention(*_ok())
    assert calls == [1]


def test_default_cpu_dispatch_is_native(monkeypatch):
    from pinpoint_kernels import backends
    monkeypatch.delenv("PINPOINT_BACKEND", raising=False)
    assert backends.resolve("head_patched_attention", torch.device("cpu"))[0] == "cpu"
    assert backends.resolve("head_slice_grad", torch.device("cpu"))[0] == "cpu"
