// The one Python binding file of pinpoint_kernels._C. Arguments are plain integers
// (data pointers, shapes, strides, dtype codes), so the module has no tie to libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using pinpoint::AttentionArgs;
using pinpoint::GroupedAtbArgs;

namespace {

const void* ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }

template <size_t N>
void copy_strides(const std::vector<int64_t>& src, int64_t (&dst)[N], const char* name) {
  if (src.size() != N) throw std::invalid_argument(std::string(name) + ": wrong number of strides");
  for (size_t i = 0; i < N; ++i) dst[i] = src[i];
}

void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int dtype,
               std::array<int64_t, 7> shape,  // R, Rk, Tq, Tk, Hq, Hkv, D
               std::vector<int64_t> q_stride, std::vector<int64_t> k_stride,
               std::vector<int64_t> v_stride, uintptr_t kv_index, uintptr_t head_mask,
               uintptr_t key_valid, uintptr_t patch, int patch_dtype,
               std::vector<int64_t> patch_stride, uintptr_t patch_index, float scale, bool causal,
               int n_threads) {
  AttentionArgs a{};
  a.q = ptr(q); a.k = ptr(k); a.v = ptr(v); a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.R = shape[0]; a.Rk = shape[1]; a.Tq = shape[2]; a.Tk = shape[3];
  a.Hq = shape[4]; a.Hkv = shape[5]; a.D = shape[6];
  copy_strides(q_stride, a.q_stride, "q");
  copy_strides(k_stride, a.k_stride, "k");
  copy_strides(v_stride, a.v_stride, "v");
  a.kv_index = ptr(kv_index); a.head_mask = ptr(head_mask); a.key_valid = ptr(key_valid);
  a.patch = ptr(patch); a.patch_dtype = patch_dtype; a.patch_index = ptr(patch_index);
  if (patch) copy_strides(patch_stride, a.patch_stride, "patch");
  a.scale = scale; a.causal = causal; a.n_threads = n_threads;
  py::gil_scoped_release nogil;
  pinpoint::head_patched_attention_cpu(a);
}

void grouped_atb(uintptr_t a, int a_dtype, int64_t a_row_stride, int64_t a_cols, uintptr_t b,
                 int b_dtype, int64_t b_row_stride, int64_t b_cols, int64_t N, int64_t M,
                 int64_t Nc, std::vector<int64_t> a_off, std::vector<int64_t> b_off, uintptr_t c,
                 int n_threads) {
  if (a_off.size() != b_off.size()) throw std::invalid_argument("a_off and b_off differ in length");
  GroupedAtbArgs g{};
  g.a = ptr(a); g.a_dtype = a_dtype; g.a_row_stride = a_row_stride; g.a_cols = a_cols;
  g.b = ptr(b); g.b_dtype = b_dtype; g.b_row_stride = b_row_stride; g.b_cols = b_cols;
  g.N = N; g.S = int64_t(a_off.size()); g.M = M; g.Nc = Nc;
  g.a_off = a_off.data(); g.b_off = b_off.data();
  g.c = reinterpret_cast<float*>(c); g.n_threads = n_threads;
  py::gil_scoped_release nogil;
  pinpoint::grouped_atb_cpu(g);
}

void slice_apply(uintptr_t weight, int weight_dtype, int64_t row_stride, int64_t col_stride,
                 int64_t out, int64_t in, uintptr_t slices, int slices_dtype,
                 std::vector<int64_t> heads, int64_t head_dim, bool by_rows, float alpha,
                 int n_threads) {
  pinpoint::SliceApplyArgs p{};
  p.weight = reinterpret_cast<void*>(weight); p.weight_dtype = weight_dtype;
  p.row_stride = row_stride; p.col_stride = col_stride; p.out = out; p.in = in;
  p.slices = ptr(slices); p.slices_dtype = slices_dtype; p.heads = std::move(heads);
  p.head_dim = head_dim; p.by_rows = by_rows; p.alpha = alpha; p.n_threads = n_threads;
  py::gil_scoped_release nogil;
  pinpoint::head_slice_apply_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pinpoint CPU kernels (OpenMP); called through pinpoint_kernels, not directly";
  m.def("head_patched_attention", &attention);
  m.def("grouped_atb", &grouped_atb);
  m.def("head_slice_apply", &slice_apply);
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1,
                                   py::arg("float16") = 2);
}
