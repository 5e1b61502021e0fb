"""Shared cases for the CUDA-kernel tests (real GPU: test_cuda_kernels.py; host emulator:
test_emulated_kernels.py). Inputs are built on the CPU from a seeded generator and then
moved, so every device sees the same numbers.

Tolerances (backend vs pinpoint_kernels.reference, which computes in fp32 and rounds once):
* fp32: atol = rtol = 1e-4. Summation order and the hardware exp2 only (~1e-6 observed in
  the emulator); a wrong index or mask is off by O(0.1) or more.
* bf16 / fp16: the tensor-core kernels, like FlashAttention and SDPA, round the softmax
  probabilities P to the input dtype before P·V, and the output is rounded once more, so
  results sit within ~2 ulps of the output dtype: atol = rtol = 2e-2 (bf16, ulp 2^-7 at 1)
  and 2e-3 (fp16, ulp 2^-10 at 1).
* Patched heads are a copy and a cast: compared exactly.
* head_slice_grad: fp32 sums of N exact products (bf16/fp16 widen exactly): summation
  order only, atol = 1e-3 + rtol = 1e-4 relative to O(sqrt(N)) sums.
* head_slice_apply: the same fp32 mul, add and one rounding as the reference: exact.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATTN_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
GRAD_TOL = dict(atol=1e-3, rtol=1e-4)


def attention_case(*, R, Tq, Tk, Hq, Hkv, D, dtype, Rk=None, pad="none", mask_mode=None,
                   patch_mode="zero", seed=0, shared_kv=False, layout="contiguous",
                   device="cpu", **_):
    """(q, k, v, head_mask, patch, kwargs) for head_patched_attention.

    layout: "contiguous"; "fused" (q/k/v are views into one [R, T, Hq + 2 Hkv, D] tensor, as
    a fused qkv projection gives); "offset" (every tensor starts one element into its
    storage, so 16-byte loads are impossible and the scalar path runs).
    """
    g = torch.Generator().manual_seed(seed)
    Rk = (Rk or R) if shared_kv else R
    q = torch.randn(R, Tq, Hq, D, generator=g).to(dtype)
    k = torch.randn(Rk, Tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Rk, Tk, Hkv, D, generator=g).to(dtype)
    kw: dict = {}
    if shared_kv:
        kw["kv_index"] = torch.randint(0, Rk, (R,), generator=g)
    if pad != "none":
        lens = torch.randint(0 if pad.endswith("empty") else 1, Tk + 1, (Rk,), generator=g)
        pos = torch.arange(Tk)[None, :]
        kw["key_padding_mask"] = pos >= (Tk - lens[:, None]) if pad.startswith("left") else pos < lens[:, None]
    head_mask = None
    if mask_mode == "random":
        head_mask = torch.rand(R, Hq, generator=g) < 0.4
    elif mask_mode == "all":
        head_mask = torch.ones(R, Hq, dtype=torch.bool)
    elif mask_mode == "none_set":
        head_mask = torch.zeros(R, Hq, dtype=torch.bool)
    elif mask_mode == "rows":  # whole rows patched, the others untouched
        head_mask = torch.zeros(R, Hq, dtype=torch.bool)
        head_mask[::2] = True
    patch = None
    if head_mask is not None:
        if patch_mode == "full":
            patch = torch.randn(R, Tq, Hq, D, generator=g).to(dtype)
        elif patch_mode == "indexed":
            patch = torch.randn(3, Tq, Hq, D, generator=g)  # fp32 patch into any dtype
            kw["patch_index"] = torch.randint(0, 3, (R,), generator=g)
        elif patch_mode == "mean":  # a per-head mean broadcast over rows and tokens
            patch = torch.randn(1, 1, Hq, D, generator=g).to(dtype).expand(1, Tq, Hq, D)
        elif patch_mode == "transposed":  # any strides: [P, Hq, Tq, D] storage
            patch = torch.randn(R, Hq, Tq, D, generator=g).to(dtype).transpose(1, 2)

    if layout == "fused":  # views into one [R, T, Hq + 2 Hkv, D] buffer
        assert Rk == R and Tq == Tk, "the fused layout needs one K/V row per row and Tq == Tk"
        qkv = torch.cat([q, k, v], dim=2).to(device)
        q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    elif layout == "offset":  # one element into the storage: no 16-byte alignment
        def shifted(x):
            out = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)[1:].view(x.shape)
            return out.copy_(x)
        q, k, v = shifted(q), shifted(k), shifted(v)
    else:
        q, k, v = q.to(device), k.to(device), v.to(device)
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return q, k, v, move(head_mask), move(patch), {n: move(x) for n, x in kw.items()}


def _c(id, **kw):
    base = dict(R=2, Tq=7, Tk=7, Hq=2, Hkv=2, D=64)
    base.update(kw)
    base["id"] = id
    return base


# Named cases: each line is one feature the kernels must get right.
ATTN_CASES = [
    _c("gqa1", Hq=4, Hkv=4, mask_mode="random", patch_mode="full"),
    _c("gqa2", Hq=4, Hkv=2, mask_mode="random", patch_mode="indexed"),
    _c("gqa4", Hq=8, Hkv=2, D=24),
    _c("decode_tq1", Tq=1, Tk=37, Hq=4, Hkv=1, D=128, pad="left"),
    _c("odd_t", Tq=67, Tk=67, D=80, mask_mode="random", patch_mode="mean"),
    _c("tq_lt_tk", Tq=13, Tk=150, Hq=2, Hkv=1, D=128),
    _c("multi_tile", R=1, Tq=200, Tk=200, Hq=2, Hkv=1, D=64, pad="right"),
    _c("d24", D=24, pad="right"),
    _c("d64", D=64, pad="left"),
    _c("d80", D=80, shared_kv=True, Rk=1),
    _c("d128", D=128, Tq=70, Tk=70, mask_mode="random", patch_mode="transposed"),
    _c("d256", D=256, Tq=40, Tk=40),
    _c("d200_odd_tile", D=200, Tq=33, Tk=40),
    _c("d20_unaligned", D=20, Tq=9, Tk=9, Hq=4, Hkv=2),
    _c("d33_odd", D=33, Tq=9, Tk=11),
    _c("left_pad", Tq=30, Tk=30, Hq=4, Hkv=2, pad="left", mask_mode="random", patch_mode="full"),
    _c("right_pad", Tq=30, Tk=30, pad="right"),
    _c("empty_rows", Tq=5, Tk=5, pad="left_empty"),  # some K/V rows have no real token
    _c("all_masked", mask_mode="all", patch_mode="full"),
    _c("all_masked_zero", mask_mode="all", patch_mode="zero"),
    _c("no_mask_set", mask_mode="none_set"),
    _c("masked_rows", R=5, mask_mode="rows", patch_mode="indexed"),
    _c("expanded_patch", Hq=4, Hkv=1, mask_mode="random", patch_mode="mean"),
    _c("shared_kv", R=6, Rk=2, shared_kv=True, Tq=20, Tk=20, pad="left", mask_mode="random",
       patch_mode="full"),
    _c("fused_qkv_view", Tq=20, Tk=20, Hq=4, Hkv=2, D=64, layout="fused"),
    _c("offset_storage", Tq=20, Tk=24, D=64, layout="offset"),
    _c("non_causal", Tq=9, Tk=30, causal=False, pad="right"),
    _c("custom_scale", Tq=9, Tk=9, scale=0.3),
]

# Cases run under every tile variant of the cuda kernel (PINPOINT_CUDA_ATTN_VARIANT=1..4).
VARIANT_CASES = [
    _c("v_d128_multi", R=2, Tq=150, Tk=200, Hq=4, Hkv=2, D=128, pad="left", mask_mode="random",
       patch_mode="full"),
    _c("v_d128_noncausal", R=1, Tq=70, Tk=70, D=128, causal=False, pad="right"),
    _c("v_d64", R=2, Tq=130, Tk=130, D=64, pad="right"),
    _c("v_d80_tq_short", R=2, Tq=20, Tk=90, D=80),
    _c("v_d24_unaligned", R=1, Tq=100, Tk=100, D=24, layout="offset"),
]

attention_shapes = st.fixed_dictionaries({
    "R": st.integers(1, 3),
    "Rk": st.integers(1, 3),
    "Tq": st.integers(1, 80),
    "extra_keys": st.sampled_from([0, 0, 1, 5, 70]),
    "Hkv": st.integers(1, 2),
    "group": st.sampled_from([1, 2, 4]),
    "D": st.sampled_from([8, 24, 64, 80, 96, 128]),
    "pad": st.sampled_from(["none", "left", "right"]),
    "mask_mode": st.sampled_from([None, "none_set", "random", "all"]),
    "patch_mode": st.sampled_from(["zero", "full", "indexed", "mean"]),
    "shared_kv": st.booleans(),
    "causal": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def from_shape(p: dict) -> dict:
    return dict(R=p["R"], Rk=p["Rk"], Tq=p["Tq"], Tk=p["Tq"] + p["extra_keys"], Hq=p["Hkv"] * p["group"],
                Hkv=p["Hkv"], D=p["D"], pad=p["pad"], mask_mode=p["mask_mode"], patch_mode=p["patch_mode"],
                shared_kv=p["shared_kv"], causal=p["causal"], seed=p["seed"])


def call_kwargs(case: dict) -> dict:
    out = {}
    if "causal" in case:
        out["causal"] = case["causal"]
    if "scale" in case:
        out["scale"] = case["scale"]
    return out


def check_attention(got, want, q, head_mask, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **ATTN_TOL[dtype])
    if head_mask is not None:  # patched heads: an exact copy of the patch (or zeros)
        R, Tq, Hq, D = q.shape
        sel = head_mask[:, None, :, None].expand(R, Tq, Hq, D)
        assert torch.equal(got.view(R, Tq, Hq, D)[sel], want.view(R, Tq, Hq, D)[sel])


GRAD_CASES = [  # (N, H, D, other, heads, by)
    (1, 2, 8, 16, [1], "rows"),
    (37, 4, 24, 40, [3, 0], "rows"),
    (37, 4, 24, 40, [2, 1], "cols"),
    (130, 6, 64, 200, [5, 0, 2], "rows"),
    (130, 6, 64, 200, [4], "cols"),
    (65, 3, 80, 96, [0, 1, 2], "rows"),
    (65, 3, 80, 96, [1], "cols"),
    (300, 4, 128, 256, [2, 3], "rows"),
    (300, 4, 128, 136, [0, 3], "cols"),
    (50, 5, 1, 7, [4, 1], "rows"),    # head_dim 1: nothing aligned
    (50, 5, 20, 33, [4, 1], "cols"),  # odd widths: the scalar-load path
]

grad_shapes = st.fixed_dictionaries({
    "N": st.integers(1, 200),
    "H": st.integers(1, 6),
    "D": st.sampled_from([1, 8, 24, 64, 80, 128]),
    "other": st.integers(1, 300),
    "n_sel": st.integers(1, 6),
    "by": st.sampled_from(["rows", "cols"]),
    "seed": st.integers(0, 2**16),
})


def grad_case(N, H, D, other, heads, by, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if by == "rows":
        dy, x = torch.randn(N, H * D, generator=g), torch.randn(N, other, generator=g)
    else:
        dy, x = torch.randn(N, other, generator=g), torch.randn(N, H * D, generator=g)
    return dy.to(dtype).to(device), x.to(dtype).to(device), torch.tensor(heads, device=device)


def check_head_slice_linear(pk, ref, *, by, dtype, device="cpu", autocast=False, bias=True):
    """head_slice_linear forward + backward against dense F.linear on the merged weight.

    Forward: bitwise equal (the op merges W + Δ exactly as head_slice_apply and runs the same
    GEMM). dX: the same GEMM up to summation order. dΔ (and dΔb): the fp32 reference slice
    gradient of the (autocast-cast) input. Under `autocast` x, W and b are fp32 and the
    projection runs in bfloat16, as nn.Linear would.
    """
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(3)
    H, D, other, heads = 4, 16, 24, [3, 1]
    out_f, in_f = (H * D, other) if by == "rows" else (other, H * D)
    pdt = torch.float32 if autocast else dtype
    w = (torch.randn(out_f, in_f, generator=g) * 0.2).to(device, pdt)
    b = (torch.randn(out_f, generator=g) * 0.1).to(device, pdt) if bias else None
    x = torch.randn(2, 5, in_f, generator=g).to(device, pdt).requires_grad_()
    delta = (torch.randn(2, *((D, in_f) if by == "rows" else (out_f, D)), generator=g) * 0.01).to(device)
    delta.requires_grad_()
    db = (torch.randn(2, D, generator=g) * 0.01).to(device).requires_grad_() if bias and by == "rows" else None
    idx = torch.tensor(heads, device=device)
    ctx = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
    with ctx():
        y = pk.head_slice_linear(x, w, b, delta, heads, D, by=by, delta_bias=db)
    dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
    y.backward(dy)

    w_eff = ref.head_slice_apply(w.detach().clone(), delta.detach(), idx, D, by=by).requires_grad_()
    b_eff = None
    if b is not None:
        b_eff = b.detach().clone()
        if db is not None:
            ref.head_slice_apply(b_eff[:, None], db.detach()[..., None], idx, D, by="rows")
    xd = x.detach().clone().requires_grad_()
    with ctx():
        yd = F.linear(xd, w_eff, b_eff)
    yd.backward(dy)
    assert y.dtype == yd.dtype and torch.equal(y, yd), "forward differs from F.linear on the merged weight"
    cdt = torch.bfloat16 if autocast else dtype
    tol = ATTN_TOL[cdt]
    torch.testing.assert_close(x.grad, xd.grad, atol=tol["atol"], rtol=tol["rtol"])
    xs = x.detach().to(cdt)
    want = ref.head_slice_grad(dy, xs, idx, D, by=by)
    torch.testing.assert_close(delta.grad, want, **GRAD_TOL)
    if db is not None:
        cols = (idx[:, None] * D + torch.arange(D, device=device)).reshape(-1)
        torch.testing.assert_close(db.grad, dy.float().reshape(-1, out_f)[:, cols].sum(0).view(2, D), **GRAD_TOL)
