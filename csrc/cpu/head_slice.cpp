// Sparse head-slice weight gradients on the CPU: one grouped Aᵀ·B over the selected heads.
// Definition: pinpoint_kernels/reference.py::head_slice_grad.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace pinpoint {
namespace {

// Register tile: 4 rows x 32 columns of fp32 accumulators (16 AVX2 registers), so each
// token does 4 broadcasts + 4 vector loads for 16 FMAs and the sums never leave registers.
constexpr int64_t kMBlock = 4, kCBlock = 32;

// A view of a [N, cols] operand as fp32 rows; 16-bit inputs are widened once, up front,
// because every selected head reads them again.
struct Fp32Rows {
  std::vector<float> storage;
  const float* data;
  int64_t row_stride;
  Fp32Rows(const void* p, int dtype, int64_t row_stride_in, int64_t N, int64_t cols, int threads) {
    if (dtype == kFloat32) {
      data = static_cast<const float*>(p);
      row_stride = row_stride_in;
      return;
    }
    storage.resize(size_t(N * cols));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) load_row(p, n * row_stride_in, 1, cols, dtype, &storage[size_t(n * cols)]);
    data = storage.data();
    row_stride = cols;
  }
};

}  // namespace

void grouped_atb_cpu(const GroupedAtbArgs& g) {
  const int threads = std::max(1, g.n_threads);
  const Fp32Rows A(g.a, g.a_dtype, g.a_row_stride, g.N, g.a_cols, threads);
  const Fp32Rows B(g.b, g.b_dtype, g.b_row_stride, g.N, g.b_cols, threads);
  const int64_t mblocks = (g.M + kMBlock - 1) / kMBlock, cblocks = (g.Nc + kCBlock - 1) / kCBlock;
  const int64_t items = g.S * mblocks * cblocks;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t s = it / (mblocks * cblocks), rest = it % (mblocks * cblocks);
    const int64_t m0 = (rest / cblocks) * kMBlock, c0 = (rest % cblocks) * kCBlock;
    const int64_t mb = std::min(kMBlock, g.M - m0), cb = std::min(kCBlock, g.Nc - c0);
    float acc[kMBlock][kCBlock] = {};
    const float* a = A.data + g.a_off[s] + m0;
    const float* b = B.data + g.b_off[s] + c0;
    if (mb == kMBlock && cb == kCBlock) {  // full tile: constant trip counts vectorise fully
      for (int64_t n = 0; n < g.N; ++n) {
        const float* an = a + n * A.row_stride;
        const float* bn = b + n * B.row_stride;
        for (int64_t mi = 0; mi < kMBlock; ++mi) {
          const float av = an[mi];
#pragma omp simd
          for (int64_t ci = 0; ci < kCBlock; ++ci) acc[mi][ci] += av * bn[ci];
        }
      }
    } else {
      for (int64_t n = 0; n < g.N; ++n) {
        const float* an = a + n * A.row_stride;
        const float* bn = b + n * B.row_stride;
        for (int64_t mi = 0; mi < mb; ++mi) {
          const float av = an[mi];
#pragma omp simd
          for (int64_t ci = 0; ci < cb; ++ci) acc[mi][ci] += av * bn[ci];
        }
      }
    }
    float* c = g.c + s * g.M * g.Nc;
    for (int64_t mi = 0; mi < mb; ++mi)
      std::copy(acc[mi], acc[mi] + cb, c + (m0 + mi) * g.Nc + c0);
  }
}

}  // namespace pinpoint

namespace pinpoint {

void head_slice_apply_cpu(const SliceApplyArgs& p) {
  const int64_t S = int64_t(p.heads.size()), D = p.head_dim;
  // rows: slice s is [D, in] at weight rows h*D..; cols: slice s is [out, D] at columns h*D..
  const int64_t lines = p.by_rows ? D : p.out, width = p.by_rows ? p.in : D;
#pragma omp parallel for num_threads(std::max(1, p.n_threads)) schedule(static)
  for (int64_t sl = 0; sl < S * lines; ++sl) {
    const int64_t s = sl / lines, line = sl % lines, h0 = p.heads[size_t(s)] * D;
    for (int64_t e = 0; e < width; ++e) {
      const int64_t w = p.by_rows ? (h0 + line) * p.row_stride + e * p.col_stride
                                  : line * p.row_stride + (h0 + e) * p.col_stride;
      const float delta = load(p.slices, sl * width + e, p.slices_dtype);
      store(p.weight, w, p.weight_dtype, load(p.weight, w, p.weight_dtype) + p.alpha * delta);
    }
  }
}

}  // namespace pinpoint
