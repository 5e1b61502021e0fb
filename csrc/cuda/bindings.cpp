// The one Python binding file of pinpoint_kernels._cuda. Arguments are plain integers
// (device pointers, shapes, strides, dtype codes, a device index and a cudaStream_t as an
// integer), so the module has no tie to libtorch. Compiled by the host compiler: it sees
// launch.h only, never a CUDA header. Every call is asynchronous on `stream`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"

namespace py = pybind11;
namespace pc = pinpoint::cuda;

namespace {

template <typename T = void>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

template <size_t N>
void copy_strides(const std::vector<int64_t>& src, int64_t (&dst)[N], const char* name) {
  if (src.size() != N)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(N) + " strides, got " +
                                std::to_string(src.size()));
  for (size_t i = 0; i < N; ++i) dst[i] = src[i];
}

void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int dtype,
               std::array<int64_t, 7> shape,  // R, Rk, Tq, Tk, Hq, Hkv, D
               std::vector<int64_t> q_stride, std::vector<int64_t> k_stride,
               std::vector<int64_t> v_stride, uintptr_t kv_index, uintptr_t head_mask,
               uintptr_t key_valid, uintptr_t patch, int patch_dtype,
               std::vector<int64_t> patch_stride, uintptr_t patch_index, float scale, bool causal,
               int device, uintptr_t stream) {
  pc::AttentionParams a{};
  a.q = cptr(q); a.k = cptr(k); a.v = cptr(v); a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.R = shape[0]; a.Rk = shape[1]; a.Tq = shape[2]; a.Tk = shape[3];
  a.Hq = shape[4]; a.Hkv = shape[5]; a.D = shape[6];
  copy_strides(q_stride, a.q_stride, "q");
  copy_strides(k_stride, a.k_stride, "k");
  copy_strides(v_stride, a.v_stride, "v");
  a.kv_index = cptr<int64_t>(kv_index);
  a.head_mask = cptr<uint8_t>(head_mask);
  a.key_valid = cptr<uint8_t>(key_valid);
  a.patch = cptr(patch); a.patch_dtype = patch_dtype; a.patch_index = cptr<int64_t>(patch_index);
  if (patch) copy_strides(patch_stride, a.patch_stride, "patch");
  a.scale = scale; a.causal = causal;
  py::gil_scoped_release nogil;
  pc::head_patched_attention(a, device, stream);
}

void grouped_atb(uintptr_t a, int a_dtype, int64_t a_row_stride, int64_t a_cols, uintptr_t b,
                 int b_dtype, int64_t b_row_stride, int64_t b_cols, int64_t N, int64_t M,
                 int64_t Nc, int64_t S, uintptr_t a_off, uintptr_t b_off, int64_t off_multiple,
                 uintptr_t c, int device, uintptr_t stream) {
  pc::GroupedAtbParams g{};
  g.a = cptr(a); g.a_dtype = a_dtype; g.a_row_stride = a_row_stride; g.a_cols = a_cols;
  g.b = cptr(b); g.b_dtype = b_dtype; g.b_row_stride = b_row_stride; g.b_cols = b_cols;
  g.N = N; g.M = M; g.Nc = Nc; g.S = S;
  g.a_off = cptr<int64_t>(a_off); g.b_off = cptr<int64_t>(b_off); g.off_multiple = off_multiple;
  g.c = reinterpret_cast<float*>(c);
  py::gil_scoped_release nogil;
  pc::grouped_atb(g, device, stream);
}

void slice_apply(uintptr_t weight, int weight_dtype, int64_t row_stride, int64_t col_stride,
                 int64_t out, int64_t in, uintptr_t slices, int slices_dtype, uintptr_t heads,
                 int64_t S, int64_t head_dim, bool by_rows, float alpha, int device, uintptr_t stream) {
  pc::SliceApplyParams p{};
  p.weight = reinterpret_cast<void*>(weight); p.weight_dtype = weight_dtype;
  p.row_stride = row_stride; p.col_stride = col_stride; p.out = out; p.in = in;
  p.slices = cptr(slices); p.slices_dtype = slices_dtype; p.heads = cptr<int64_t>(heads);
  p.S = S; p.head_dim = head_dim; p.by_rows = by_rows; p.alpha = alpha;
  py::gil_scoped_release nogil;
  pc::head_slice_apply(p, device, stream);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pinpoint CUDA kernels (raw device pointers, no libtorch); called through pinpoint_kernels";
  m.def("head_patched_attention", &attention,
        "q, k, v, out, dtype, [R, Rk, Tq, Tk, Hq, Hkv, D], q_stride[3], k_stride[3], v_stride[3], "
        "kv_index, head_mask, key_valid, patch, patch_dtype, patch_stride[4], patch_index, scale, "
        "causal, device, stream");
  m.def("grouped_atb", &grouped_atb,
        "a, a_dtype, a_row_stride, a_cols, b, b_dtype, b_row_stride, b_cols, N, M, Nc, S, a_off, "
        "b_off, off_multiple, c, device, stream: C[s][m][c] = sum_n A[n, a_off[s]+m] B[n, b_off[s]+c]");
  m.def("head_slice_apply", &slice_apply,
        "weight, weight_dtype, row_stride, col_stride, out, in, slices, slices_dtype, heads, S, "
        "head_dim, by_rows, alpha, device, stream");
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1,
                                   py::arg("float16") = 2);
  m.attr("MAX_HEAD_DIM") = pc::kMaxHeadDim;
}
