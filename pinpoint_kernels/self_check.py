"""Small known-answer cases that a backend must pass before its first use in a process.

:func:`pinpoint_kernels.backends.resolve` runs :func:`run` once per (op, backend, dtype,
device kind, head_dim) and falls back to the next backend if it fails. Each case calls the
backend's *launcher* directly (the same normalised arguments the public op passes: int64
index tensors, contiguous bool masks, unit last stride) on tiny real tensors built on the
target device, and compares with :mod:`pinpoint_kernels.reference` computed in fp32 on the
CPU (so a TF32 setting or a broken device reference cannot mask a fault).

The cases are tiny but touch every feature the kernels branch on: GQA, Tq < Tk, shared K/V
rows, left padding (including a query with no visible key), an indexed patch, patched and
unpatched heads; head-slice gradients by rows and by cols; a merge into a contiguous weight
and into a transposed (Conv1D) view. Tolerances sit several times above the backends'
tested rounding error and far below what a wrong index or mask gives (O(0.1)).

    python -m pinpoint_kernels.self_check [--backend cpu|triton|...]   # one-time cost per op, ms
"""
from __future__ import annotations

import argparse
import time

import torch

from . import reference as ref

OPS = ("head_patched_attention", "head_slice_grad", "head_slice_apply")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# |got - want| <= atol + rtol * |want|; the kernel tests' tolerances are 1e-4 / 2e-2 / 2e-3.
ATTN_TOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}
GRAD_TOL = dict(atol=2e-3, rtol=1e-3)  # fp32 sums of 19 exact products
DEFAULT_HEAD_DIM = {"head_patched_attention": 64, "head_slice_grad": 16, "head_slice_apply": 16}


class SelfCheckMismatch(AssertionError):
    """A backend returned a wrong value on a self-check case."""


# Every factory call names device and dtype: a default-device context (`with torch.device(...)`)
# or a changed default dtype must not change the case.
def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device="cpu", dtype=torch.float32)


def _ints(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device="cpu")


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float) -> None:
    """Raise SelfCheckMismatch unless got (any device) matches want (CPU fp32) in shape and value."""
    if tuple(got.shape) != tuple(want.shape):
        raise SelfCheckMismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g = got.detach().float().cpu()
    bad = ~((g - want).abs() <= atol + rtol * want.abs())  # NaN counts as bad
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise SelfCheckMismatch(f"{what}: {int(bad.sum())} of {bad.numel()} values wrong, e.g. at {i} "
                                f"got {float(g[i]):.6g}, expected {float(want[i]):.6g}")


def check_attention(fn, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """One call: R=3 rows on Rk=2 K/V rows, Tq=5 of Tk=9, Hq=4 on Hkv=2, causal, left padding
    (K/V row 1 hides its first 6 keys, so its first query sees none), an indexed patch."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    R, Rk, Tq, Tk, Hq, Hkv, D = 3, 2, 5, 9, 4, 2, head_dim
    q, k, v = _randn(g, R, Tq, Hq, D), _randn(g, Rk, Tk, Hkv, D), _randn(g, Rk, Tk, Hkv, D)
    patch = _randn(g, 2, Tq, Hq, D)
    head_mask = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool, device="cpu")
    kv_index, patch_index = _ints(0, 1, 1), _ints(1, 0, 0)
    kpm = torch.ones(Rk, Tk, dtype=torch.bool, device="cpu")
    kpm[1, :6] = False
    cpu = [x.to(dtype) for x in (q, k, v, patch)]
    want = ref.head_patched_attention(*(x.float() for x in cpu[:3]), head_mask, cpu[3].float(), kv_index=kv_index,
                                      patch_index=patch_index, key_padding_mask=kpm, scale=D**-0.5)
    dev = [x.to(device) for x in cpu]
    got = fn(dev[0], dev[1], dev[2], head_mask.to(device), dev[3], kv_index=kv_index.to(device),
             patch_index=patch_index.to(device), key_padding_mask=kpm.to(device), scale=D**-0.5, causal=True)
    if got.dtype != dtype:
        raise SelfCheckMismatch(f"output dtype {got.dtype}, expected {dtype}")
    tol = ATTN_TOL[dtype]
    _compare("attention output", got, want, atol=tol, rtol=tol)


def check_grad(fn, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Two calls, by="rows" (q/k/v) and by="cols" (o_proj): 2 of 3 heads, N=19 tokens."""
    g = torch.Generator(device="cpu").manual_seed(4321)
    N, H, D, other = 19, 3, head_dim, 24
    heads = _ints(2, 0)
    for by in ("rows", "cols"):
        dy = _randn(g, N, H * D if by == "rows" else other).to(dtype)
        x = _randn(g, N, other if by == "rows" else H * D).to(dtype)
        want = ref.head_slice_grad(dy.float(), x.float(), heads, D, by=by)
        got = fn(dy.to(device), x.to(device), heads.to(device), D, by=by)
        if got.dtype != torch.float32:
            raise SelfCheckMismatch(f"by={by}: gradient dtype {got.dtype}, expected torch.float32")
        _compare(f"gradient by={by}", got, want, **GRAD_TOL)


def check_apply(fn, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Merge fp32 slices with alpha=-1 into a contiguous weight (by rows) and into a transposed
    Conv1D view (by cols). The contract is one fp32 sum and one rounding: exact."""
    g = torch.Generator(device="cpu").manual_seed(2468)
    H, D, other = 3, head_dim, 24
    heads = _ints(2, 0)
    for by in ("rows", "cols"):
        store = _randn(g, H * D, other).to(dtype)  # rows: [out, in]; cols: the [in, out] storage
        slices = _randn(g, 2, *((D, other) if by == "rows" else (other, D))) * 0.01
        want = ref.head_slice_apply((store if by == "rows" else store.t()).clone(), slices, heads, D,
                                    by=by, alpha=-1.0)
        w = store.to(device)
        view = w if by == "rows" else w.t()
        fn(view, slices.to(device), heads.to(device), D, by=by, alpha=-1.0)
        _compare(f"merged weight by={by}", view, want.float(), atol=0.0, rtol=0.0)


CHECKS = {"head_patched_attention": check_attention, "head_slice_grad": check_grad,
          "head_slice_apply": check_apply}


def run(op: str, fn, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> None:
    """Run `op`'s case through launcher `fn` on `device` in `dtype`; raise on any fault.

    Needs real tensors: the caller (backends.resolve) leaves fake/meta modes first."""
    check = CHECKS.get(op)
    if check is None:
        raise KeyError(f"no self-check case for op {op!r}; known: {', '.join(CHECKS)}")
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        check(fn, device, dtype, int(head_dim or DEFAULT_HEAD_DIM[op]))
        if device.type == "cuda":  # surface asynchronous launch errors here, not later
            torch.cuda.synchronize(device)


def measure(backend: str, device: str = "cpu", repeat: int = 3) -> list[dict]:
    """One-time cost of each op's check on `backend` (ms per dtype; the first run includes
    any compilation, later runs are the steady cost). Rows for a results table."""
    from . import backends

    dev = torch.device(device)
    rows = []
    for op in OPS:
        fn = backends._launcher(backend, op, dev)  # the check's own cost: first_ms includes JIT
        for dtype in DTYPES:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                run(op, fn, dev, dtype)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({"backend": backend, "op": op, "dtype": str(dtype).replace("torch.", ""),
                         "first_ms": times[0], "steady_ms": min(times)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", help="backends to time (default: cpu, triton)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| backend | op | dtype | first run ms | steady ms |\n|---|---|---|---:|---:|")
    for backend in args.backend or ["cpu", "triton"]:
        for r in measure(backend, args.device):
            print(f"| {r['backend']} | {r['op']} | {r['dtype']} | {r['first_ms']:.2f} | {r['steady_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
