// Fused head-patched attention on the CPU (OpenMP, fp32 accumulation).
// Definition: pinpoint_kernels/reference.py::head_patched_attention.
//
// Work is grouped by the K/V head a query head reads: each work item stages one
// (K/V row, K/V head) in fp32 once and then serves every (row, query head) that reads it,
// so variants sharing K/V rows (and GQA groups) convert and stream K/V once. Masked
// (row, head) pairs never enter that loop: they only copy their patch value.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace pinpoint {
namespace {

constexpr int kQueryBlock = 4;  // queries scored together so each K row is loaded once

struct Reader { int64_t row, head; };
struct WorkItem { int64_t pair, begin, end; };  // readers [begin, end) of one K/V pair

}  // namespace

void head_patched_attention_cpu(const AttentionArgs& a) {
  const int64_t R = a.R, Tq = a.Tq, Tk = a.Tk, Hq = a.Hq, Hkv = a.Hkv, D = a.D;
  const int64_t group = Hq / Hkv, offset = Tk - Tq;
  const auto* kv_index = static_cast<const int64_t*>(a.kv_index);
  const auto* head_mask = static_cast<const uint8_t*>(a.head_mask);
  const auto* key_valid = static_cast<const uint8_t*>(a.key_valid);
  const auto* patch_index = static_cast<const int64_t*>(a.patch_index);

  // Readers of each K/V pair, in (row, head) order; masked pairs go to `patched`.
  std::vector<std::vector<Reader>> readers(size_t(a.Rk * Hkv));
  std::vector<Reader> patched;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < Hq; ++h) {
      if (head_mask && head_mask[r * Hq + h]) patched.push_back({r, h});
      else readers[size_t(kv_index[r] * Hkv + h / group)].push_back({r, h});
    }
  int64_t total = 0;
  for (auto& v : readers) total += int64_t(v.size());
  const int threads = std::max(1, a.n_threads);
  const int64_t chunk = std::max<int64_t>(1, total / (4 * int64_t(threads)));
  std::vector<WorkItem> items;
  for (int64_t p = 0; p < int64_t(readers.size()); ++p)
    for (int64_t b = 0; b < int64_t(readers[p].size()); b += chunk)
      items.push_back({p, b, std::min<int64_t>(b + chunk, int64_t(readers[p].size()))});

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kbuf(size_t(Tk * D)), vbuf(size_t(Tk * D));
    std::vector<float> qbuf(size_t(kQueryBlock * D)), sbuf(size_t(kQueryBlock * Tk));
    std::vector<float> obuf(size_t(kQueryBlock * D));
    std::vector<int64_t> keys(static_cast<size_t>(Tk));  // attendable key positions, ascending

#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < int64_t(items.size()); ++it) {
      const WorkItem w = items[size_t(it)];
      const int64_t kr = w.pair / Hkv, kh = w.pair % Hkv;
      for (int64_t j = 0; j < Tk; ++j) {
        load_row(a.k, kr * a.k_stride[0] + j * a.k_stride[1] + kh * a.k_stride[2], 1, D, a.dtype,
                 &kbuf[size_t(j * D)]);
        load_row(a.v, kr * a.v_stride[0] + j * a.v_stride[1] + kh * a.v_stride[2], 1, D, a.dtype,
                 &vbuf[size_t(j * D)]);
      }
      int64_t n_valid_keys = 0;
      for (int64_t j = 0; j < Tk; ++j)
        if (!key_valid || key_valid[kr * Tk + j]) keys[size_t(n_valid_keys++)] = j;

      for (int64_t ri = w.begin; ri < w.end; ++ri) {
        const Reader rd = readers[size_t(w.pair)][size_t(ri)];
        for (int64_t i0 = 0; i0 < Tq; i0 += kQueryBlock) {
          const int64_t nb = std::min<int64_t>(kQueryBlock, Tq - i0);
          for (int64_t b = 0; b < nb; ++b) {
            load_row(a.q, rd.row * a.q_stride[0] + (i0 + b) * a.q_stride[1] + rd.head * a.q_stride[2],
                     1, D, a.dtype, &qbuf[size_t(b * D)]);
            for (int64_t d = 0; d < D; ++d) qbuf[size_t(b * D + d)] *= a.scale;
          }
          // Keys visible to the last query of the block; earlier queries stop sooner.
          const int64_t last_pos = a.causal ? offset + i0 + nb - 1 : Tk - 1;
          const int64_t n_keys = std::upper_bound(keys.begin(), keys.begin() + n_valid_keys, last_pos) -
                                 keys.begin();
          for (int64_t kk = 0; kk < n_keys; ++kk) {
            const float* kj = &kbuf[size_t(keys[size_t(kk)] * D)];
            for (int64_t b = 0; b < nb; ++b) {
              const float* qb = &qbuf[size_t(b * D)];
              float s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t d = 0; d < D; ++d) s += qb[d] * kj[d];
              sbuf[size_t(b * Tk + kk)] = s;
            }
          }
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t pos = a.causal ? offset + i0 + b : Tk - 1;
            const int64_t nk = std::upper_bound(keys.begin(), keys.begin() + n_keys, pos) - keys.begin();
            float* s = &sbuf[size_t(b * Tk)];
            float* o = &obuf[size_t(b * D)];
            std::fill(o, o + D, 0.f);
            if (nk > 0) {
              float m = -std::numeric_limits<float>::infinity();
              for (int64_t kk = 0; kk < nk; ++kk) m = std::max(m, s[kk]);
              float l = 0.f;
              for (int64_t kk = 0; kk < nk; ++kk) { s[kk] = std::exp(s[kk] - m); l += s[kk]; }
              for (int64_t kk = 0; kk < nk; ++kk) {
                const float p = s[kk];
                const float* vj = &vbuf[size_t(keys[size_t(kk)] * D)];
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
              }
              const float inv = 1.f / l;
              for (int64_t d = 0; d < D; ++d) o[d] *= inv;
            }
            const int64_t base = ((rd.row * Tq + i0 + b) * Hq + rd.head) * D;
            for (int64_t d = 0; d < D; ++d) store(a.out, base + d, a.dtype, o[d]);
          }
        }
      }
    }

#pragma omp for schedule(static)
    for (int64_t pi = 0; pi < int64_t(patched.size()); ++pi) {
      const Reader rd = patched[size_t(pi)];
      for (int64_t t = 0; t < Tq; ++t) {
        const int64_t base = ((rd.row * Tq + t) * Hq + rd.head) * D;
        if (!a.patch) {
          for (int64_t d = 0; d < D; ++d) store(a.out, base + d, a.dtype, 0.f);
          continue;
        }
        const int64_t src = patch_index[rd.row] * a.patch_stride[0] + t * a.patch_stride[1] +
                            rd.head * a.patch_stride[2];
        for (int64_t d = 0; d < D; ++d)
          store(a.out, base + d, a.dtype, load(a.patch, src + d * a.patch_stride[3], a.patch_dtype));
      }
    }
  }
}

}  // namespace pinpoint
