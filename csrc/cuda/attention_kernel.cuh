// Fused head-patched attention kernels. Definition: pinpoint_kernels/reference.py.
//
// One thread block per (query tile, row r, query head h); blockIdx.x = r * Hq + h and
// blockIdx.y walks the query tiles last-first (under the causal mask the last tile is the
// longest, so the long blocks are scheduled first). A block whose (r, h) is masked does no
// attention math: it only writes patch[patch_index[r], t, h, :] (or zeros) to its tile.
//
// bf16/fp16: FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//   BM queries per block (16 or 32 per warp, 4 or 8 warps: see the variants below), BN keys
//   per K/V tile, head_dim padded to DP (a multiple of 16) with zeros. Q, K, V tiles live in
//   shared memory with rows padded by 16 bytes (conflict-free ldmatrix). Q fragments stay in
//   registers when they are few (MT * DP <= 128), else are re-read from shared memory.
//   S = Q·Kᵀ and O += P·V use ldmatrix (.trans for V); the online softmax works on the
//   S accumulators in place (base 2, scale folded into scale_log2), and P is re-packed into
//   A fragments without touching shared memory. K/V loads are cp.async (16-byte, zero-fill
//   past the ends), overlapped with compute: V(j) loads during S(j), K(j+1) during P·V(j).
// fp32: a SIMT kernel (16 queries per block, 32-key tiles, one key per lane for the scores,
//   D/32 output columns per lane for P·V), exact fp32 products.
#pragma once

#include <cmath>

#include "common.cuh"

namespace pinpoint {
namespace cuda {

constexpr float kNegInf = -INFINITY;

// The patch value (or zeros) for queries [i0, i0 + ni) of (row r, head h), cast to out's dtype.
PP_DEVICE void write_patch(const AttentionParams& p, int64_t r, int64_t h, int64_t i0, int64_t ni,
                           int tid, int nthreads) {
  const int64_t D = p.D;
  const int64_t pr = p.patch ? p.patch_index[r] : 0;
  for (int64_t idx = tid; idx < ni * D; idx += nthreads) {
    const int64_t ii = idx / D, d = idx - ii * D, i = i0 + ii;
    float x = 0.f;
    if (p.patch)
      x = load_any(p.patch, pr * p.patch_stride[0] + i * p.patch_stride[1] + h * p.patch_stride[2] +
                                d * p.patch_stride[3],
                   p.patch_dtype);
    store_any(p.out, ((r * p.Tq + i) * p.Hq + h) * D + d, p.dtype, x);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16).

// MT m16 tiles (16 query rows each) per warp, WARPS warps: BM = 16 * MT * WARPS queries per
// block. MT = 2 reuses every K/V fragment for two row tiles (half the shared-memory traffic
// per MMA, as FlashAttention-2 does); Q fragments stay in registers when they are few.
template <int DP, int BN, int MT, int WARPS>
struct AttnTcConfig {
  static constexpr int kBM = 16 * MT * WARPS;
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kLd = DP + 8;  // smem row stride in elements (16-byte padding)
  static constexpr bool kQInRegs = MT * DP <= 128;
  static constexpr size_t kSmemBytes = size_t(kBM + 2 * BN) * kLd * sizeof(uint16_t);
  static_assert(DP % 16 == 0 && BN % 16 == 0, "tile sizes must be multiples of 16");
};

// ROWS x DP tile of 16-bit rows [row0, row0 + ROWS) of a [n_rows, D] slab (row stride
// `row_stride`, unit column stride) into shared memory (row stride DP + 8); rows >= n_rows
// and columns >= D are zero-filled. vec: 16-byte cp.async (needs D % 8 == 0 and 16-byte
// aligned rows); otherwise plain element loads.
template <int ROWS, int DP, int THREADS>
PP_DEVICE void load_tile16(uint16_t* s, const uint16_t* g, int64_t row_stride, int64_t row0,
                           int64_t n_rows, int D, bool vec, int tid) {
  constexpr int kLd = DP + 8, kChunks = DP / 8;  // 16-byte chunks per row
  if constexpr (THREADS % kChunks == 0 && ROWS % (THREADS / kChunks) == 0) {
    // Each thread owns one chunk column and walks rows with a single pointer, so the
    // unrolled loop keeps one address (not one per chunk) live across the main loop.
    constexpr int kRowStep = THREADS / kChunks;
    const int rr0 = tid / kChunks, d0 = (tid - rr0 * kChunks) * 8;
    const bool d_ok = d0 < D;
    const uint16_t* src = g + (row0 + rr0) * row_stride + d0;
    uint16_t* dst = s + rr0 * kLd + d0;
    int64_t row = row0 + rr0;
    PP_UNROLL
    for (int i = 0; i < ROWS / kRowStep; ++i) {
      const bool in_rows = row < n_rows;
      if (vec) {
        const bool ok = in_rows && d_ok;
        cp_async_16(dst, ok ? src : g, ok);
      } else {
        PP_UNROLL
        for (int e = 0; e < 8; ++e) dst[e] = (in_rows && d0 + e < D) ? src[e] : uint16_t(0);
      }
      row += kRowStep;
      src += kRowStep * row_stride;
      dst += kRowStep * kLd;
    }
  } else {
    PP_UNROLL
    for (int c0 = 0; c0 < ROWS * kChunks; c0 += THREADS) {
      const int c = c0 + tid;
      if (ROWS * kChunks % THREADS != 0 && c >= ROWS * kChunks) break;
      const int rr = c / kChunks, d0 = (c - rr * kChunks) * 8;
      uint16_t* dst = s + rr * kLd + d0;
      const int64_t row = row0 + rr;
      const bool in_rows = row < n_rows;
      if (vec) {
        const bool ok = in_rows && d0 < D;
        cp_async_16(dst, ok ? g + row * row_stride + d0 : g, ok);
      } else {
        PP_UNROLL
        for (int e = 0; e < 8; ++e) {
          const int d = d0 + e;
          dst[e] = (in_rows && d < D) ? g[row * row_stride + d] : uint16_t(0);
        }
      }
    }
  }
}

template <int DT, int DP, int BN, int MT, int WARPS>
PP_GLOBAL void PP_LAUNCH_BOUNDS(32 * WARPS) attention_tc_kernel(const AttentionParams p) {
  using Cfg = AttnTcConfig<DP, BN, MT, WARPS>;
  constexpr int BM = Cfg::kBM, LD = Cfg::kLd, NT = Cfg::kThreads;
  constexpr bool kQInRegs = Cfg::kQInRegs;
  PP_DYNAMIC_SMEM(smem_raw);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + BM * LD;
  uint16_t* sV = sK + BN * LD;

  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t Hq = p.Hq, Tq = p.Tq, Tk = p.Tk;
  const int D = int(p.D);
  const int64_t r = int64_t(blockIdx.x) / Hq, h = int64_t(blockIdx.x) % Hq;
  const int64_t m0 = int64_t(gridDim.y - 1 - blockIdx.y) * BM;

  if (p.head_mask && p.head_mask[r * Hq + h]) {
    write_patch(p, r, h, m0, Tq - m0 < BM ? Tq - m0 : BM, tid, NT);
    return;  // uniform over the block
  }

  const int64_t kr = p.kv_index[r], kh = h / (Hq / p.Hkv);
  const int64_t offset = Tk - Tq;  // absolute position of query 0
  const int64_t n_end = p.causal ? (offset + m0 + BM < Tk ? offset + m0 + BM : Tk) : Tk;
  const int n_tiles = int((n_end + BN - 1) / BN);

  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + r * p.q_stride[0] + h * p.q_stride[2];
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + kr * p.k_stride[0] + kh * p.k_stride[2];
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + kr * p.v_stride[0] + kh * p.v_stride[2];
  const uint8_t* kvalid = p.key_valid ? p.key_valid + kr * Tk : nullptr;

  load_tile16<BM, DP, NT>(sQ, qg, p.q_stride[1], m0, Tq, D, p.vec, tid);
  load_tile16<BN, DP, NT>(sK, kg, p.k_stride[1], 0, Tk, D, p.vec, tid);
  cp_async_commit();

  const int wrow = warp * 16 * MT;  // this warp's first query row in the tile
  // Lane's ldmatrix row/column offsets for an A operand (Q) and for K (non-transposed B).
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;
  uint32_t qf[kQInRegs ? MT : 1][kQInRegs ? DP / 16 : 1][4];
  float o[MT][DP / 8][4];
  float row_m[MT][2], row_l[MT][2];  // running max (base-2 logits) / this thread's partial sums
  PP_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    row_m[mt][0] = row_m[mt][1] = kNegInf;
    row_l[mt][0] = row_l[mt][1] = 0.f;
    PP_UNROLL
    for (int i = 0; i < DP / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  }
  const float sl2 = p.scale_log2;

  for (int jt = 0; jt < n_tiles; ++jt) {
    const int64_t j0 = int64_t(jt) * BN;
    cp_async_wait<0>();  // K(jt) (and Q on the first pass) landed for this thread's copies
    __syncthreads();     // ... for everyone's; and every warp is done with V(jt - 1)
    if constexpr (kQInRegs) {
      if (jt == 0) {
        PP_UNROLL
        for (int mt = 0; mt < MT; ++mt)
          PP_UNROLL
          for (int kk = 0; kk < DP / 16; ++kk)
            ldmatrix_x4(qf[mt][kk], sQ + (wrow + mt * 16 + a_row) * LD + kk * 16 + a_col);
      }
    }
    load_tile16<BN, DP, NT>(sV, vg, p.v_stride[1], j0, Tk, D, p.vec, tid);
    cp_async_commit();

    // S = Q Kᵀ for this warp's 16*MT rows x BN keys.
    float s[MT][BN / 8][4];
    PP_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      PP_UNROLL
      for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
    PP_UNROLL
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t a[MT][4];
      PP_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (kQInRegs) {
          a[mt][0] = qf[mt][kk][0]; a[mt][1] = qf[mt][kk][1];
          a[mt][2] = qf[mt][kk][2]; a[mt][3] = qf[mt][kk][3];
        } else {
          ldmatrix_x4(a[mt], sQ + (wrow + mt * 16 + a_row) * LD + kk * 16 + a_col);
        }
      }
      PP_UNROLL
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + (np * 16 + k_row) * LD + kk * 16 + k_col);
        PP_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<DT>(s[mt][2 * np], a[mt], kb[0], kb[1]);
          mma_16816<DT>(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
        }
      }
    }

    // Scale to base-2 logits and mask: keys past Tk, after the query (causal), or padding.
    const bool need_mask = j0 + BN > Tk || kvalid != nullptr || (p.causal && j0 + BN - 1 > offset + m0);
    PP_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      PP_UNROLL
      for (int nt = 0; nt < BN / 8; ++nt)
        PP_UNROLL
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][nt][e] * sl2;
          if (need_mask) {
            const int64_t i = m0 + wrow + mt * 16 + g + ((e >> 1) << 3);
            const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
            const bool ok = j < Tk && (!p.causal || j <= offset + i) && (kvalid == nullptr || kvalid[j]);
            if (!ok) x = kNegInf;
          }
          s[mt][nt][e] = x;
        }

    // Online softmax; each row is spread over the 4 threads of a quad.
    PP_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      PP_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        float mx = kNegInf;
        PP_UNROLL
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_new = fmaxf(row_m[mt][hr], mx);
        const float m_use = m_new == kNegInf ? 0.f : m_new;  // no key yet: keep exp2 finite
        const float alpha = fast_exp2(row_m[mt][hr] - m_use);  // 0 when row_m was -inf
        row_m[mt][hr] = m_new;
        float sum = 0.f;
        PP_UNROLL
        for (int nt = 0; nt < BN / 8; ++nt) {
          s[mt][nt][2 * hr] = fast_exp2(s[mt][nt][2 * hr] - m_use);
          s[mt][nt][2 * hr + 1] = fast_exp2(s[mt][nt][2 * hr + 1] - m_use);
          sum += s[mt][nt][2 * hr] + s[mt][nt][2 * hr + 1];
        }
        row_l[mt][hr] = row_l[mt][hr] * alpha + sum;
        PP_UNROLL
        for (int dn = 0; dn < DP / 8; ++dn) {
          o[mt][dn][2 * hr] *= alpha;
          o[mt][dn][2 * hr + 1] *= alpha;
        }
      }

    cp_async_wait<0>();  // V(jt)
    __syncthreads();     // V visible to all; every warp is done reading K(jt)
    if (jt + 1 < n_tiles) {
      load_tile16<BN, DP, NT>(sK, kg, p.k_stride[1], j0 + BN, Tk, D, p.vec, tid);
      cp_async_commit();
    }

    // O += P V. P as A fragments: keys 16kk..16kk+15 are S tiles 2kk (cols 0-7), 2kk+1 (8-15).
    PP_UNROLL
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
      PP_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<DT>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack2<DT>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack2<DT>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<DT>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      PP_UNROLL
      for (int dp = 0; dp < DP / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + (kk * 16 + a_row) * LD + dp * 16 + a_col);
        PP_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<DT>(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
          mma_16816<DT>(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Normalise and store rows g and g + 8 of each m tile: out[r, i, h*D + d].
  PP_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    PP_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_l[mt][hr];
      l += shfl_xor(l, 1);
      l += shfl_xor(l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;  // no attendable key: zeros
      const int64_t i = m0 + wrow + mt * 16 + g + 8 * hr;
      if (i < Tq) {
        uint16_t* orow = static_cast<uint16_t*>(p.out) + ((r * Tq + i) * Hq + h) * int64_t(D);
        PP_UNROLL
        for (int dn = 0; dn < DP / 8; ++dn) {
          const int d = dn * 8 + 2 * t;
          const float v0 = o[mt][dn][2 * hr] * inv, v1 = o[mt][dn][2 * hr + 1] * inv;
          if ((D & 1) == 0) {  // d even, D even: d < D implies d + 1 < D, 4-byte aligned
            if (d < D) *reinterpret_cast<uint32_t*>(orow + d) = pack2<DT>(v0, v1);
          } else {
            if (d < D) orow[d] = from_float<DT>(v0);
            if (d + 1 < D) orow[d + 1] = from_float<DT>(v1);
          }
        }
      }
    }
}

template <int DT, int DP, int BN, int MT, int WARPS>
void launch_attention_tc_cfg(const AttentionParams& p, uintptr_t stream) {
  using Cfg = AttnTcConfig<DP, BN, MT, WARPS>;
  const dim3 grid(unsigned(p.R * p.Hq), unsigned((p.Tq + Cfg::kBM - 1) / Cfg::kBM));
  launch(attention_tc_kernel<DT, DP, BN, MT, WARPS>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p,
         "head_patched_attention");
}

// Tile configurations ("variants") of the tensor-core kernel, as (BN, MT, WARPS):
//   1: (64, 1, 4) BM = 64,  16 rows per warp, Q in registers (short Tq)
//   2: (64, 2, 4) BM = 128, 32 rows per warp (FlashAttention-2's sm80/sm90 tile)
//   3: (32, 2, 4) BM = 128, 32 rows per warp, half-size K/V tiles (fewer registers)
//   4: (64, 1, 8) BM = 128, 16 rows per warp, 8 warps share each K/V tile
// Every head_dim <= 128 has 1 and 3; 2 and 4 are built for head_dim 128 only (Llama-type
// models; elsewhere they fall back to 3 and 1); head_dim > 128 always uses (32, 1, 4).
// Default: 1 when Tq <= 64, else 3 (2 is leaner in shared-memory traffic per MMA but spills
// a few registers). PINPOINT_CUDA_ATTN_VARIANT=1..4 forces one (benchmarks, tests).
template <int DT, int DP>
void launch_attention_tc_dp(const AttentionParams& p, uintptr_t stream, int variant) {
  if constexpr (DP > 128) {
    launch_attention_tc_cfg<DT, DP, 32, 1, 4>(p, stream);
  } else {
    if (variant < 1 || variant > 4) variant = p.Tq <= 64 ? 1 : 3;
    if constexpr (DP == 128) {
      if (variant == 2) return launch_attention_tc_cfg<DT, DP, 64, 2, 4>(p, stream);
      if (variant == 4) return launch_attention_tc_cfg<DT, DP, 64, 1, 8>(p, stream);
    }
    if (variant == 2 || variant == 3) return launch_attention_tc_cfg<DT, DP, 32, 2, 4>(p, stream);
    return launch_attention_tc_cfg<DT, DP, 64, 1, 4>(p, stream);
  }
}

// head_dim -> the padded tile width of an instantiated kernel.
template <int DT>
void launch_attention_tc(const AttentionParams& p, uintptr_t stream, int variant) {
  const int64_t D = p.D;
  if (D <= 32) launch_attention_tc_dp<DT, 32>(p, stream, variant);
  else if (D <= 64) launch_attention_tc_dp<DT, 64>(p, stream, variant);
  else if (D <= 80) launch_attention_tc_dp<DT, 80>(p, stream, variant);
  else if (D <= 96) launch_attention_tc_dp<DT, 96>(p, stream, variant);
  else if (D <= 128) launch_attention_tc_dp<DT, 128>(p, stream, variant);
  else if (D <= 160) launch_attention_tc_dp<DT, 160>(p, stream, variant);
  else if (D <= 192) launch_attention_tc_dp<DT, 192>(p, stream, variant);
  else launch_attention_tc_dp<DT, 256>(p, stream, variant);
}

// ---------------------------------------------------------------------------------------
// fp32 SIMT kernel.

struct AttnF32Config {
  static constexpr int kQB = 16;     // queries per block
  static constexpr int kQPW = 4;     // queries per warp
  static constexpr int kKB = 32;     // keys per tile (one per lane)
  static constexpr int kThreads = 128;
  static size_t smem_bytes(int D) { return size_t(kQB * D + kKB * (D | 1) + kKB * D) * sizeof(float); }
};

// DC = ceil(D / 32): output columns per lane (d = lane + 32c).
template <int DC>
PP_GLOBAL void PP_LAUNCH_BOUNDS(128) attention_f32_kernel(const AttentionParams p) {
  using Cfg = AttnF32Config;
  constexpr int QB = Cfg::kQB, QPW = Cfg::kQPW, KB = Cfg::kKB, NT = Cfg::kThreads;
  PP_DYNAMIC_SMEM(smem_raw);
  const int D = int(p.D), LDK = D | 1;  // odd K row stride: lane = key reads are conflict-free
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + QB * D;
  float* sV = sK + KB * LDK;

  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int64_t Hq = p.Hq, Tq = p.Tq, Tk = p.Tk;
  const int64_t r = int64_t(blockIdx.x) / Hq, h = int64_t(blockIdx.x) % Hq;
  const int64_t m0 = int64_t(gridDim.y - 1 - blockIdx.y) * QB;

  if (p.head_mask && p.head_mask[r * Hq + h]) {
    write_patch(p, r, h, m0, Tq - m0 < QB ? Tq - m0 : QB, tid, NT);
    return;
  }

  const int64_t kr = p.kv_index[r], kh = h / (Hq / p.Hkv);
  const int64_t offset = Tk - Tq;
  const int64_t n_end = p.causal ? (offset + m0 + QB < Tk ? offset + m0 + QB : Tk) : Tk;
  const float* qg = static_cast<const float*>(p.q) + r * p.q_stride[0] + h * p.q_stride[2];
  const float* kg = static_cast<const float*>(p.k) + kr * p.k_stride[0] + kh * p.k_stride[2];
  const float* vg = static_cast<const float*>(p.v) + kr * p.v_stride[0] + kh * p.v_stride[2];
  const uint8_t* kvalid = p.key_valid ? p.key_valid + kr * Tk : nullptr;
  const float sl2 = p.scale_log2;

  for (int idx = tid; idx < QB * D; idx += NT) {  // queries, pre-scaled to base-2 logits
    const int qq = idx / D, d = idx - qq * D;
    const int64_t i = m0 + qq;
    sQ[idx] = i < Tq ? qg[i * p.q_stride[1] + d] * sl2 : 0.f;
  }

  float o[QPW][DC];
  float row_m[QPW], row_l[QPW];
  PP_UNROLL
  for (int qq = 0; qq < QPW; ++qq) {
    row_m[qq] = kNegInf;
    row_l[qq] = 0.f;
    PP_UNROLL
    for (int c = 0; c < DC; ++c) o[qq][c] = 0.f;
  }
  const float* myq = sQ + warp * QPW * D;

  for (int64_t j0 = 0; j0 < n_end; j0 += KB) {
    __syncthreads();  // the previous tile is consumed (and sQ is written, first pass)
    for (int idx = tid; idx < KB * D; idx += NT) {
      const int jj = idx / D, d = idx - jj * D;
      const int64_t j = j0 + jj;
      const bool in = j < Tk;
      sK[jj * LDK + d] = in ? kg[j * p.k_stride[1] + d] : 0.f;
      sV[jj * D + d] = in ? vg[j * p.v_stride[1] + d] : 0.f;
    }
    __syncthreads();

    const int64_t j = j0 + lane;  // this lane's key
    const bool key_ok = j < Tk && (kvalid == nullptr || kvalid[j]);
    float sc[QPW];
    PP_UNROLL
    for (int qq = 0; qq < QPW; ++qq) sc[qq] = 0.f;
    const float* krow = sK + lane * LDK;
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
      PP_UNROLL
      for (int qq = 0; qq < QPW; ++qq) sc[qq] += myq[qq * D + d] * kd;
    }
    PP_UNROLL
    for (int qq = 0; qq < QPW; ++qq) {
      const int64_t i = m0 + warp * QPW + qq;
      const bool ok = key_ok && (!p.causal || j <= offset + i);
      const float x = ok ? sc[qq] : kNegInf;
      const float m_new = fmaxf(row_m[qq], warp_max(x));
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = fast_exp2(row_m[qq] - m_use);
      const float pj = fast_exp2(x - m_use);
      row_l[qq] = row_l[qq] * alpha + warp_sum(pj);
      row_m[qq] = m_new;
      PP_UNROLL
      for (int c = 0; c < DC; ++c) o[qq][c] *= alpha;
      sc[qq] = pj;
    }
    for (int jj = 0; jj < KB; ++jj) {
      float pq[QPW];
      PP_UNROLL
      for (int qq = 0; qq < QPW; ++qq) pq[qq] = shfl_idx(sc[qq], jj);
      const float* vrow = sV + jj * D;
      PP_UNROLL
      for (int c = 0; c < DC; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          const float vd = vrow[d];
          PP_UNROLL
          for (int qq = 0; qq < QPW; ++qq) o[qq][c] += pq[qq] * vd;
        }
      }
    }
  }

  PP_UNROLL
  for (int qq = 0; qq < QPW; ++qq) {
    const int64_t i = m0 + warp * QPW + qq;
    if (i >= Tq) continue;
    const float inv = row_l[qq] > 0.f ? 1.f / row_l[qq] : 0.f;
    float* orow = static_cast<float*>(p.out) + ((r * Tq + i) * Hq + h) * int64_t(D);
    PP_UNROLL
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) orow[d] = o[qq][c] * inv;
    }
  }
}

}  // namespace cuda
}  // namespace pinpoint
