"""The Triton kernels against pinpoint_kernels.reference, run by the Triton interpreter.

TRITON_INTERPRET=1 is set before anything imports triton, so the kernels run on CPU
tensors without a GPU. The interpreter executes every program in Python, so each case is
tiny; the tile-size caps are lowered in a few tests to reach multi-tile paths (online
softmax across key tiles, causal tile skipping, several GEMM tiles and K steps).
"""
from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import pinpoint_kernels as pk  # noqa: E402
from pinpoint_kernels import reference as ref  # noqa: E402

tattn = importlib.import_module("pinpoint_kernels.triton.attention")
tslice = importlib.import_module("pinpoint_kernels.triton.head_slice")
from pinpoint_kernels.triton._common import is_interpreted  # noqa: E402

if not is_interpreted(tattn._head_patched_attention_kernel):
    pytest.skip("pinpoint_kernels.triton was imported for the GPU earlier in this process; "
                "the interpreter tests need TRITON_INTERPRET=1 before that import",
                allow_module_level=True)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BF16_ULP_BITS = 7  # bfloat16 stores 7 fraction bits: ulp(x) = 2**(floor(log2|x|) - 7)


def bf16_ulp(x: float) -> float:
    return 2.0 ** (torch.tensor(max(x, 1e-30)).log2().floor().item() - BF16_ULP_BITS)


def attn(*args, **kwargs):
    return pk.head_patched_attention(*args, backend="triton", **kwargs)


def make_padding(Rk: int, Tk: int, kind: str, gen: torch.Generator) -> torch.Tensor | None:
    """bool [Rk, Tk], True = real token; row 0 keeps every token, the others lose 1..Tk-1."""
    if kind == "none":
        return None
    kpm = torch.ones(Rk, Tk, dtype=torch.bool)
    for r in range(1, Rk):
        n_pad = int(torch.randint(1, Tk, (1,), generator=gen)) if Tk > 1 else 0
        if kind == "left":
            kpm[r, :n_pad] = False
        else:
            kpm[r, Tk - n_pad:] = False
    return kpm


def check_attention(out, expect, q, v, head_mask, dtype):
    assert out.shape == expect.shape and out.dtype == expect.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    else:
        # bf16 tolerance, 2 ulps of the magnitude: the reference rounds the exact fp32
        # result once (<= 0.5 ulp); the kernel rounds P to bf16 before P.V (relative error
        # <= 2**-9 per weight, so <= 2**-9 * max|v| ~ 0.5 ulp of max|v| in the sum, the
        # weights summing to 1) and rounds its fp32 result once (<= 0.5 ulp). That is at
        # most 1.5 ulps of max(|out|, |v|); the fp32 accumulation order adds far less.
        mag = max(expect.float().abs().max().item(), v.float().abs().max().item())
        torch.testing.assert_close(out.float(), expect.float(), rtol=0, atol=2 * bf16_ulp(mag))
    if head_mask is not None:  # patched heads are copies: exact whatever the dtype
        R, Tq, Hq, D = q.shape
        sel = head_mask[:, None, :, None].expand(R, Tq, Hq, D)
        o4, e4 = out.reshape(R, Tq, Hq, D), expect.reshape(R, Tq, Hq, D)
        assert torch.equal(o4[sel], e4[sel])


# (R, Rk, Tq, Tk, Hq, Hkv, D, causal, padding, mask, patch)
#   mask: none | random | all | none_set (a head_mask with no True);
#   patch: none | rows (patch_index into P rows) | expanded (stride-0 mean) | own (P = R)
ATTN_CASES = {
    "mha_plain": (2, 2, 5, 5, 2, 2, 16, True, "none", "none", "none"),
    "gqa2_kvindex_left_patchindex": (3, 2, 3, 7, 4, 2, 24, True, "left", "random", "rows"),
    "gqa4_decode_right_zero": (2, 2, 1, 9, 4, 1, 16, True, "right", "random", "none"),
    "noncausal_left_expanded": (2, 2, 4, 9, 2, 1, 24, False, "left", "random", "expanded"),
    "all_masked": (2, 2, 3, 3, 2, 1, 16, True, "none", "all", "own"),
    "no_mask_rows": (3, 3, 9, 9, 2, 2, 24, True, "right", "none_set", "own"),
}


def build_attention_case(case, dtype, seed=0):
    R, Rk, Tq, Tk, Hq, Hkv, D, causal, padding, mask, patch_kind = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(R, Tq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(Rk, Tk, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(Rk, Tk, Hkv, D, generator=gen).to(dtype)
    kw = dict(causal=causal, key_padding_mask=make_padding(Rk, Tk, padding, gen))
    if Rk != R:
        kw["kv_index"] = torch.randint(0, Rk, (R,), generator=gen)
    head_mask = None
    if mask == "random":
        head_mask = torch.rand(R, Hq, generator=gen) < 0.5
        head_mask[0, 0], head_mask[0, -1] = True, False
    elif mask == "all":
        head_mask = torch.ones(R, Hq, dtype=torch.bool)
    elif mask == "none_set":
        head_mask = torch.zeros(R, Hq, dtype=torch.bool)
    if head_mask is not None:
        kw["head_mask"] = head_mask
        if patch_kind == "rows":
            kw["patch"] = torch.randn(4, Tq, Hq, D, generator=gen).to(dtype)
            kw["patch_index"] = torch.randint(0, 4, (R,), generator=gen)
        elif patch_kind == "expanded":  # a per-head mean: stride 0 over rows and tokens
            mean = torch.randn(1, 1, Hq, D, generator=gen)  # fp32 patch for a bf16 q too
            kw["patch"] = mean.expand(R, Tq, Hq, D)
        elif patch_kind == "own":
            kw["patch"] = torch.randn(R, Tq, Hq, D, generator=gen).to(dtype)
    return q, k, v, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_matches_reference(name, dtype):
    q, k, v, kw = build_attention_case(ATTN_CASES[name], dtype)
    out = attn(q, k, v, **kw)
    check_attention(out, ref.head_patched_attention(q, k, v, **kw), q, v, kw.get("head_mask"), dtype)


def test_attention_fp16_and_strided_q():
    # q as a view into a fused qkv projection output: non-contiguous rows and tokens.
    gen = torch.Generator().manual_seed(1)
    R, T, Hq, Hkv, D = 2, 6, 4, 2, 16
    qkv = torch.randn(R, T, (Hq + 2 * Hkv) * D, generator=gen).half()
    q = qkv[..., :Hq * D].view(R, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].view(R, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(R, T, Hkv, D)
    assert not q.is_contiguous()
    out = attn(q, k, v)
    expect = ref.head_patched_attention(q, k, v)
    torch.testing.assert_close(out.float(), expect.float(), rtol=0, atol=4e-3)  # 4 fp16 ulps at 1


def test_attention_unattendable_queries_are_zero():
    # Left padding under the causal mask: the first queries may attend to no key at all.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=gen) for _ in range(3))
    kpm = torch.tensor([[False, False, True, True, True]])
    out = attn(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], torch.zeros(2, 32))
    torch.testing.assert_close(out, ref.head_patched_attention(q, k, v, key_padding_mask=kpm),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq", [40, 20])
def test_attention_multi_tile(monkeypatch, Tq):
    # 16 x 16 tiles over 40 keys: three key tiles, online softmax rescaling across tiles,
    # causal tiles above the diagonal skipped, and with 20 padded keys on the left a first
    # key tile that is masked out entirely (m stays -inf there without producing NaN).
    monkeypatch.setattr(tattn, "MAX_BLOCK_M", 16)
    monkeypatch.setattr(tattn, "MAX_BLOCK_N", 16)
    gen = torch.Generator().manual_seed(3)
    Tk = 40
    q = torch.randn(2, Tq, 2, 16, generator=gen)
    k, v = (torch.randn(2, Tk, 1, 16, generator=gen) * 3 for _ in range(2))
    kpm = torch.ones(2, Tk, dtype=torch.bool)
    kpm[1, :20] = False
    for causal in (True, False):
        out = attn(q, k, v, key_padding_mask=kpm, causal=causal)
        expect = ref.head_patched_attention(q, k, v, key_padding_mask=kpm, causal=causal)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    R=st.integers(1, 3), Tq=st.integers(1, 9), extra_k=st.integers(0, 4),
    Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 24]),
    causal=st.booleans(), padding=st.sampled_from(["none", "left", "right"]),
    mask=st.sampled_from(["none", "random", "all"]),
    patch=st.sampled_from(["none", "rows", "expanded", "own"]), seed=st.integers(0, 2**16),
)
def test_attention_random_shapes(R, Tq, extra_k, Hkv, group, D, causal, padding, mask, patch,
                                 seed):
    Tk = min(Tq + extra_k, 9)
    case = (R, R, Tq, Tk, Hkv * group, Hkv, D, causal, padding, mask, patch)
    q, k, v, kw = build_attention_case(case, torch.float32, seed)
    out = attn(q, k, v, **kw)
    check_attention(out, ref.head_patched_attention(q, k, v, **kw), q, v, kw.get("head_mask"),
                    torch.float32)


# ----------------------------------------------------------------------- head_slice_grad

GRAD_DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_fp32_mixed": (torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("dtypes", list(GRAD_DTYPES))
@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("N", [7, 40])  # one K step; two K steps of 32
def test_head_slice_grad(by, dtypes, N):
    gen = torch.Generator().manual_seed(4)
    D, H, other = 24, 4, 40
    dt_dy, dt_x = GRAD_DTYPES[dtypes]
    heads = torch.tensor([3, 0])
    if by == "rows":  # q/k/v: grad_out [N, H*D], X [N, in]
        dy, x = torch.randn(N, H * D, generator=gen), torch.randn(N, other, generator=gen)
    else:  # o_proj: grad_out [N, out], Z [N, H*D]
        dy, x = torch.randn(N, other, generator=gen), torch.randn(N, H * D, generator=gen)
    dy, x = dy.to(dt_dy), x.to(dt_x)
    out = pk.head_slice_grad(dy, x, heads, D, by=by, backend="triton")
    expect = ref.head_slice_grad(dy, x, heads, D, by=by)
    assert out.dtype == torch.float32
    assert out.shape == ((2, D, other) if by == "rows" else (2, other, D))
    # 16-bit products are exact in fp32: only the fp32 summation order differs.
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_grad_multi_tile_strided(monkeypatch, by):
    # 16 x 16 x 16 tiles: several M and N tiles per head and three K steps; leading dims
    # flattened into N; grad_out a column slice of a wider tensor (row stride > width).
    for name in ("MAX_BLOCK_M", "MAX_BLOCK_N", "MAX_BLOCK_K"):
        monkeypatch.setattr(tslice, name, 16)
    gen = torch.Generator().manual_seed(5)
    D, H, other = 24, 3, 40
    feats = (H * D, other) if by == "rows" else (other, H * D)
    dy = torch.randn(2, 19, feats[0] + 8, generator=gen)[..., 8:]
    x = torch.randn(2, 19, feats[1], generator=gen)
    heads = [2, 0, 1]
    out = pk.head_slice_grad(dy, x, heads, D, by=by, backend="triton")
    torch.testing.assert_close(out, ref.head_slice_grad(dy, x, torch.tensor(heads), D, by=by),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- head_slice_apply

def dyadic(*shape, gen):
    """Values k / 256 with |k| < 1024: every sum and difference of two is exact in fp32."""
    return torch.randint(-1023, 1024, shape, generator=gen).float() / 256


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_apply_matches_reference(by, dtype, transposed):
    gen = torch.Generator().manual_seed(6)
    D, H, other = 24, 3, 20
    shape = (H * D, other) if by == "rows" else (other, H * D)
    base = torch.randn(*shape, generator=gen).to(dtype)
    weight = base.t().contiguous().t() if transposed else base.clone()  # Conv1D-style view
    assert weight.is_contiguous() != transposed
    heads = torch.tensor([2, 0])
    sl_shape = (2, D, other) if by == "rows" else (2, other, D)
    slices = torch.randn(*sl_shape, generator=gen)
    expect = ref.head_slice_apply(base.clone(), slices, heads, D, by=by, alpha=0.37)
    res = pk.head_slice_apply(weight, slices, heads, D, by=by, alpha=0.37, backend="triton")
    assert res is weight
    assert torch.equal(weight, expect)  # same fp32 ops, one rounding: bitwise equal


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_head_slice_apply_round_trip_exact(by, transposed):
    gen = torch.Generator().manual_seed(7)
    D, H, other = 16, 4, 12
    shape = (H * D, other) if by == "rows" else (other, H * D)
    w0 = dyadic(*shape, gen=gen)
    weight = w0.t().contiguous().t() if transposed else w0.clone()
    heads = [1, 3]
    sl_shape = (2, D, other) if by == "rows" else (2, other, D)
    slices = dyadic(*sl_shape, gen=gen)
    pk.head_slice_apply(weight, slices, heads, D, by=by, alpha=1.0, backend="triton")
    cols = (torch.tensor(heads)[:, None] * D + torch.arange(D)).reshape(-1)
    changed = weight[cols] if by == "rows" else weight[:, cols]
    untouched = torch.ones(H * D, dtype=torch.bool)
    untouched[cols] = False
    assert not torch.equal(changed, w0[cols] if by == "rows" else w0[:, cols])
    if by == "rows":
        assert torch.equal(weight[untouched], w0[untouched])
    else:
        assert torch.equal(weight[:, untouched], w0[:, untouched])
    pk.head_slice_apply(weight, slices, heads, D, by=by, alpha=-1.0, backend="triton")
    assert torch.equal(weight, w0)


def test_bf16_rounding_is_nearest_even():
    # Into a zero bf16 weight, apply writes round(slices) exactly as torch rounds fp32 to
    # bf16 (nearest, ties to even), including exact ties, which the interpreter's own cast
    # would truncate.
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(2, 16, 8, generator=gen).bfloat16().float()
    ulp = torch.ldexp(torch.ones_like(base), torch.frexp(base)[1] - 8)
    ties = base + ulp / 2  # exactly halfway between two bf16 values
    slices = torch.cat([ties[:1], torch.randn(1, 16, 8, generator=gen)])
    weight = torch.zeros(8, 2 * 16, dtype=torch.bfloat16)
    pk.head_slice_apply(weight, slices.transpose(1, 2).contiguous(), [0, 1], 16, by="cols",
                        backend="triton")
    assert torch.equal(weight.t().reshape(2, 16, 8), slices.to(torch.bfloat16))
