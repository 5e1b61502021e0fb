"""A few CUDA-kernel cases to run under compute-sanitizer (bench/gpu_check.sh).

    compute-sanitizer --tool memcheck  python3 tests/gpu/sanitize_cases.py attention grad apply
    compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_cases.py multi_tile

Each case runs the cuda backend once and checks it against pinpoint_kernels.reference on the
CPU (so the sanitizer instruments pinpoint's kernels, not a reference GEMM). The sanitizer
reports invalid accesses / shared-memory hazards itself (its --error-exitcode); this script
exits 1 on a wrong value, 2 without a usable cuda backend. Cases come from _cases.py: padding
and shared K/V rows, odd head_dim with unaligned (scalar) loads, GQA with Tq < Tk; both
gradient layouts at an odd width; a merge into a transposed view.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[1] / "python")]

import pinpoint_kernels as pk  # noqa: E402
from pinpoint_kernels import backends  # noqa: E402
from pinpoint_kernels import reference as ref  # noqa: E402


def _cases_module():
    spec = importlib.util.spec_from_file_location("pinpoint_gpu_tests__cases", HERE / "_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _cases_module()
DEV = "cuda"  # test_emulated_kernels.py swaps in "cpu" to run these through the CUDA emulator
ATTENTION = ["shared_kv", "d20_unaligned", "tq_lt_tk"]  # ids in C.ATTN_CASES
GRAD = [C.GRAD_CASES[2], C.GRAD_CASES[10]]  # by cols, and odd widths by cols
MULTI_TILE = C.VARIANT_CASES[0]  # 150 queries x 200 keys, D=128: several tiles each way


def _attention(case: dict, dtype: torch.dtype) -> None:
    q, k, v, hm, patch, kw = C.attention_case(dtype=dtype, device=DEV, **case)
    extra = C.call_kwargs(case)
    got = pk.head_patched_attention(q, k, v, hm, patch, backend="cuda", **kw, **extra).cpu()
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    want = ref.head_patched_attention(cpu(q), cpu(k), cpu(v), cpu(hm), cpu(patch),
                                      **{n: cpu(x) for n, x in kw.items()}, **extra)
    C.check_attention(got, want, cpu(q), cpu(hm), dtype)


def run_attention() -> None:
    by_id = {c["id"]: c for c in C.ATTN_CASES}
    for name in ATTENTION:
        for dtype in (torch.bfloat16, torch.float32):
            _attention(by_id[name], dtype)
            print(f"attention {name} {dtype}: ok", flush=True)


def run_grad() -> None:
    for case in GRAD + [C.GRAD_CASES[1]]:
        dy, x, heads = C.grad_case(*case, dtype=torch.bfloat16, device=DEV)
        got = pk.head_slice_grad(dy, x, heads, case[2], by=case[5], backend="cuda").cpu()
        want = ref.head_slice_grad(dy.cpu(), x.cpu(), heads.cpu(), case[2], by=case[5])
        torch.testing.assert_close(got, want, **C.GRAD_TOL)
        print(f"head_slice_grad {case[:4]} by {case[5]}: ok", flush=True)


def run_apply() -> None:
    conv_w = torch.randn(24, 32)  # GPT-2 Conv1D storage [in, out]; merge by rows of its .t()
    slices = torch.randn(2, 8, 24)
    want = ref.head_slice_apply(conv_w.t().clone(), slices, torch.tensor([3, 0]), 8, by="rows")
    w = conv_w.to(DEV)
    pk.head_slice_apply(w.t(), slices.to(DEV), [3, 0], 8, by="rows", backend="cuda")
    assert torch.equal(w.t().cpu(), want), "head_slice_apply on a transposed view differs from the reference"
    print("head_slice_apply transposed view: ok", flush=True)


def run_multi_tile() -> None:
    _attention(MULTI_TILE, torch.bfloat16)
    print(f"attention {MULTI_TILE['id']} bf16: ok", flush=True)


RUN = {"attention": run_attention, "grad": run_grad, "apply": run_apply, "multi_tile": run_multi_tile}


def main(argv: list[str]) -> int:
    """Run the named case groups; 0 ok, 1 on a wrong value, 2 on bad usage / no cuda backend."""
    unknown = [a for a in argv if a not in RUN]
    if not argv or unknown:
        print(f"usage: sanitize_cases.py {{{','.join(RUN)}}}...; unknown: {unknown}", file=sys.stderr)
        return 2
    why = backends._usable("cuda", torch.device(DEV)) if DEV != "cuda" or torch.cuda.is_available() \
        else "no CUDA device"
    if why:
        print(f"sanitize_cases: the cuda backend is unavailable: {why}", file=sys.stderr)
        return 2
    failed = 0
    for name in argv:
        try:
            RUN[name]()
        except AssertionError as exc:
            print(f"sanitize_cases {name}: WRONG VALUE: {exc}", file=sys.stderr)
            failed = 1
    if DEV == "cuda":
        torch.cuda.synchronize()
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
