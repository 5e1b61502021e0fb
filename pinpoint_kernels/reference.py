"""Plain PyTorch definitions of pinpoint's ops.

Every faster backend (``_C`` on the CPU, Triton, ``_cuda``) is tested against these
functions; when they disagree, these are right. They favour clarity over speed, but still
avoid per-(row, head) Python loops so they stay usable as a fallback.

Shapes use: R variant rows, Rk K/V rows, Tq query tokens, Tk key tokens (Tq <= Tk; the
queries are the last Tq of the Tk positions), Hq query heads, Hkv K/V heads, D head_dim,
N tokens (flattened batch), S selected heads.
"""
from __future__ import annotations

import torch

__all__ = ["head_patched_attention", "head_patched_attention_vjp", "head_slice_grad", "head_slice_grad_vjp",
           "head_slice_apply"]


def head_patched_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    patch: torch.Tensor | None = None,
    *,
    kv_index: torch.Tensor | None = None,
    patch_index: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Scaled-dot-product attention over many variant rows, with per-(row, head) patches.

    Args:
        q: [R, Tq, Hq, D] queries (the layout q_proj produces; no transpose needed).
        k, v: [Rk, Tk, Hkv, D]. Query head h reads K/V head h // (Hq // Hkv).
        head_mask: bool [R, Hq]; True means "patched": the head's output is replaced by
            the patch value and its attention is not computed. None: nothing patched.
        patch: [P, Tq, Hq, D] patch values (any strides, so a per-head mean can be an
            expanded view). Row r takes patch row ``patch_index[r]``; without patch_index
            P must be R or 1. None: patched heads output zero (zero ablation).
        kv_index: int [R] in [0, Rk): row r attends over K/V row ``kv_index[r]``, so
            variants share K/V storage. None: Rk must equal R and row r reads row r.
        key_padding_mask: bool [Rk, Tk], True for real tokens (left or right padding).
            Indexed by K/V row, since padding belongs to the sequence.
        scale: softmax scale; default D ** -0.5.
        causal: queries at absolute position Tk - Tq + i see keys j <= Tk - Tq + i
            (bottom-right aligned, as with a KV cache).

    Returns:
        [R, Tq, Hq * D] in q's dtype: the o_proj input layout. A query that may attend to
        no key at all (e.g. a left-padding position) outputs zeros.

    Softmax and the weighted sum accumulate in fp32 whatever the input dtype.
    """
    R, Tq, Hq, D = q.shape
    Rk, Tk, Hkv, _ = k.shape
    group = Hq // Hkv
    idx = torch.arange(R, device=q.device) if kv_index is None else kv_index.long()

    qf = q.float().transpose(1, 2)  # [R, Hq, Tq, D]
    kf = k.float()[idx].repeat_interleave(group, dim=2).transpose(1, 2)  # [R, Hq, Tk, D]
    vf = v.float()[idx].repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)

    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        pos_q = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        allowed = torch.arange(Tk, device=q.device)[None, :] <= pos_q
    allowed = allowed[None, None].expand(R, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[idx][:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> zeros
    out = (probs @ vf).transpose(1, 2)  # [R, Tq, Hq, D] fp32

    if head_mask is not None:
        if patch is None:
            pv = torch.zeros((), device=q.device)
        else:
            pidx = patch_index.long() if patch_index is not None else None
            pv = patch.float()[pidx] if pidx is not None else patch.float().expand(R, Tq, Hq, D)
        out = torch.where(head_mask.bool()[:, None, :, None], pv, out)
    return out.to(q.dtype).reshape(R, Tq, Hq * D)


def head_patched_attention_vjp(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    head_mask: torch.Tensor | None, patch: torch.Tensor | None, *, kv_index: torch.Tensor | None,
    patch_index: torch.Tensor | None, key_padding_mask: torch.Tensor | None, scale: float | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dpatch) of :func:`head_patched_attention` for an output
    gradient ``grad`` [R, Tq, Hq*D]: the vector-Jacobian product of this very definition
    (``torch.func.vjp``), so it is exact by construction and traceable by ``torch.compile``.
    Each gradient has its input's shape and dtype; dpatch is None without a patch. It
    recomputes the forward (scores [R, Hq, Tq, Tk] in fp32): there is no fused backward."""
    def forward(q_, k_, v_, patch_):
        return head_patched_attention(q_, k_, v_, head_mask, patch_, kv_index=kv_index, patch_index=patch_index,
                                      key_padding_mask=key_padding_mask, scale=scale, causal=causal)

    if patch is None:
        _, pull = torch.func.vjp(lambda q_, k_, v_: forward(q_, k_, v_, None), q, k, v)
        return (*pull(grad.to(q.dtype)), None)
    _, pull = torch.func.vjp(forward, q, k, v, patch)
    return pull(grad.to(q.dtype))


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[S] head indices -> [S, D] feature indices of those heads."""
    return heads.long()[:, None] * head_dim + torch.arange(head_dim, device=heads.device)


def head_slice_grad(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    heads: torch.Tensor,
    head_dim: int,
    *,
    by: str = "rows",
) -> torch.Tensor:
    """Weight gradients of only the selected heads' slices of a projection Y = X Wᵀ.

    by="rows" (q/k/v, heads split the output features):
        grad_out [N, H*D], inp X [N, in]  ->  [S, D, in], dW[s] = dY[:, rows(h_s)]ᵀ · X
    by="cols" (o_proj, heads split the input features):
        grad_out [N, out], inp Z [N, H*D] ->  [S, out, D], dW[s] = dYᵀ · Z[:, cols(h_s)]

    Leading dimensions of grad_out and inp are flattened into N. The result is fp32
    (the products accumulate in fp32), ready for fp32 master slices.
    """
    dy = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x = inp.reshape(-1, inp.shape[-1]).float()
    cols = _head_columns(heads.to(dy.device), head_dim)  # [S, D]
    if by == "rows":
        return torch.einsum("nsd,ni->sdi", dy[:, cols], x)
    if by == "cols":
        return torch.einsum("no,nsd->sod", dy, x[:, cols])
    raise ValueError(f"head_slice_grad: by must be 'rows' or 'cols', got {by!r}")


def head_slice_grad_vjp(
    grad: torch.Tensor,
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    heads: torch.Tensor,
    head_dim: int,
    *,
    by: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`head_slice_grad` (bilinear in grad_out and inp) for an output
    gradient ``grad`` ([S, D, in] by rows, [S, out, D] by cols): (d grad_out, d inp), each
    in its input's shape and dtype, computed in fp32.

    by="rows": out[s,d,i] = Σ_n dY[n, c(s,d)] X[n,i], so dDY[n, c(s,d)] = Σ_i g[s,d,i] X[n,i]
    (zero on unselected features) and dX[n,i] = Σ_{s,d} g[s,d,i] dY[n, c(s,d)].
    by="cols": out[s,o,d] = Σ_n dY[n,o] Z[n, c(s,d)], so dDY[n,o] = Σ_{s,d} g[s,o,d] Z[n, c(s,d)]
    and dZ[n, c(s,d)] = Σ_o g[s,o,d] dY[n,o] (zero on unselected features).
    """
    dy = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x = inp.reshape(-1, inp.shape[-1]).float()
    g = grad.float()
    cols = _head_columns(heads.to(dy.device), head_dim)  # [S, D]
    flat = cols.reshape(-1)
    n = dy.shape[0]
    if by == "rows":
        d_dy = dy.new_zeros(dy.shape).index_copy(1, flat, torch.einsum("sdi,ni->nsd", g, x).reshape(n, -1))
        d_x = torch.einsum("sdi,nsd->ni", g, dy[:, cols])
    elif by == "cols":
        d_dy = torch.einsum("sod,nsd->no", g, x[:, cols])
        d_x = x.new_zeros(x.shape).index_copy(1, flat, torch.einsum("sod,no->nsd", g, dy).reshape(n, -1))
    else:
        raise ValueError(f"head_slice_grad: by must be 'rows' or 'cols', got {by!r}")
    return d_dy.to(grad_out.dtype).view(grad_out.shape), d_x.to(inp.dtype).view(inp.shape)


def head_slice_apply(
    weight: torch.Tensor,
    slices: torch.Tensor,
    heads: torch.Tensor,
    head_dim: int,
    *,
    by: str = "rows",
    alpha: float = 1.0,
) -> torch.Tensor:
    """Add ``alpha * slices`` into the selected heads' slices of ``weight``, in place.

    weight: [out, in] (nn.Linear layout). by="rows": slices [S, D, in] go to rows
    h_s*D:(h_s+1)*D; by="cols": slices [S, out, D] go to those columns. alpha=+1 merges
    trained deltas, alpha=-1 takes them back out. The sum is formed in fp32 and rounded
    once to weight's dtype. Returns weight.
    """
    cols = _head_columns(heads.to(weight.device), head_dim).reshape(-1)
    if by == "rows":
        cur = weight[cols].float()
        weight[cols] = (cur + alpha * slices.float().reshape(cur.shape)).to(weight.dtype)
    elif by == "cols":
        cur = weight[:, cols].float()
        new = cur + alpha * slices.float().permute(1, 0, 2).reshape(cur.shape)
        weight[:, cols] = new.to(weight.dtype)
    else:
        raise ValueError(f"head_slice_apply: by must be 'rows' or 'cols', got {by!r}")
    return weight
