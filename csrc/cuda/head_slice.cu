// Sparse head-slice gradients (one grouped Aᵀ·B launch over all selected heads) and the
// slice merge/detach update. Definitions: pinpoint_kernels/reference.py::head_slice_grad,
// head_slice_apply.
//
// grouped_atb: C[s][m][c] = sum_n A[n, a_off[s] + m] * B[n, b_off[s] + c], fp32 out [S, M, Nc].
// The slices are read in place through the offsets (no gathered copies). blockIdx =
// (c tile, m tile, s).
//   bf16/fp16 (A and B of one dtype): tensor cores. 128x128 output tile per block of 8 warps
//     (2 along m x 4 along c, 64x32 each), 32 tokens per k-step, two cp.async stages. Both
//     operands sit in shared memory as [token][feature] and reach mma.sync through
//     ldmatrix.trans, which yields exactly the A (m x k) and B (k x c) fragments.
//   fp32 or mixed dtypes: a SIMT kernel (64x64 tile, 4x4 outputs per thread), fp32 FMAs.
#include "common.cuh"

namespace pinpoint {
namespace cuda {
namespace {

constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kTcThreads = 256;
constexpr int kTcLd = 128 + 8;                       // smem row stride (elements)
constexpr int kTcStage = 2 * kTcBK * kTcLd;          // A then B, elements per stage
constexpr size_t kTcSmem = size_t(2) * kTcStage * sizeof(uint16_t);

// BK x 128 tile of A rows [n0, n0 + BK), columns [col0, col0 + 128) (relative to `base`)
// into shared memory; out-of-range tokens and columns (>= cols) are zero-filled.
PP_DEVICE void load_atb_tile(uint16_t* s, const uint16_t* base, int64_t row_stride, int64_t n0,
                             int64_t N, int64_t cols, bool vec, const void* any_valid_ptr, int tid) {
  constexpr int kChunksPerRow = 128 / 8, kChunks = kTcBK * kChunksPerRow;  // 512
  PP_UNROLL
  for (int c0 = 0; c0 < kChunks; c0 += kTcThreads) {
    const int c = c0 + tid;
    const int rr = c / kChunksPerRow, col = (c - rr * kChunksPerRow) * 8;
    const int64_t n = n0 + rr;
    uint16_t* dst = s + rr * kTcLd + col;
    if (vec) {  // cols % 8 == 0: a chunk is all in or all out
      const bool ok = n < N && col < cols;
      cp_async_16(dst, ok ? static_cast<const void*>(base + n * row_stride + col) : any_valid_ptr, ok);
    } else {
      PP_UNROLL
      for (int e = 0; e < 8; ++e)
        dst[e] = (n < N && col + e < cols) ? base[n * row_stride + col + e] : uint16_t(0);
    }
  }
}

template <int DT>
PP_GLOBAL void PP_LAUNCH_BOUNDS(256) grouped_atb_tc_kernel(const GroupedAtbParams p) {
  PP_DYNAMIC_SMEM(smem_raw);
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., cols wn*32..
  const int64_t s = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * kTcBM, c0 = int64_t(blockIdx.x) * kTcBN;
  const int64_t M = p.M, Nc = p.Nc, N = p.N;
  const uint16_t* a_base = static_cast<const uint16_t*>(p.a) + (p.a_off ? p.a_off[s] : 0) + m0;
  const uint16_t* b_base = static_cast<const uint16_t*>(p.b) + (p.b_off ? p.b_off[s] : 0) + c0;
  const int64_t m_cols = M - m0, c_cols = Nc - c0;

  float acc[4][4][4];
  PP_UNROLL
  for (int i = 0; i < 4; ++i)
    PP_UNROLL
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  const int64_t k_tiles = (N + kTcBK - 1) / kTcBK;
  auto load_stage = [&](int stage, int64_t n0) {
    uint16_t* sA = smem + stage * kTcStage;
    load_atb_tile(sA, a_base, p.a_row_stride, n0, N, m_cols, p.vec, p.a, tid);
    load_atb_tile(sA + kTcBK * kTcLd, b_base, p.b_row_stride, n0, N, c_cols, p.vec, p.b, tid);
  };
  load_stage(0, 0);
  cp_async_commit();

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) {
      load_stage(int((kt + 1) & 1), (kt + 1) * kTcBK);
      cp_async_commit();
      cp_async_wait<1>();  // all but the stage just issued
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* sA = smem + (kt & 1) * kTcStage;
    const uint16_t* sB = sA + kTcBK * kTcLd;
    PP_UNROLL
    for (int kk = 0; kk < kTcBK / 16; ++kk) {
      uint32_t af[4][4], bf[2][4];
      // A fragment (m x k) from [k][m] storage: matrices (k 0-7, m 0-7), (k 0-7, m 8-15),
      // (k 8-15, m 0-7), (k 8-15, m 8-15) -> a0a1, a2a3, a4a5, a6a7.
      PP_UNROLL
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4_trans(af[mt], sA + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kTcLd + wm * 64 +
                                      mt * 16 + ((lane >> 3) & 1) * 8);
      // B fragments (k x c) from [k][c] storage: (k 0-7, c 0-7), (k 8-15, c 0-7) -> tile 0,
      // (k 0-7, c 8-15), (k 8-15, c 8-15) -> tile 1.
      PP_UNROLL
      for (int np = 0; np < 2; ++np)
        ldmatrix_x4_trans(bf[np], sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kTcLd +
                                      wn * 32 + np * 16 + (lane >> 4) * 8);
      PP_UNROLL
      for (int mt = 0; mt < 4; ++mt)
        PP_UNROLL
        for (int nt = 0; nt < 4; ++nt)
          mma_16816<DT>(acc[mt][nt], af[mt], bf[nt >> 1][(nt & 1) * 2], bf[nt >> 1][(nt & 1) * 2 + 1]);
    }
    __syncthreads();  // this stage is reloaded by the next iteration's prefetch
  }

  float* C = p.c + s * M * Nc;
  PP_UNROLL
  for (int mt = 0; mt < 4; ++mt)
    PP_UNROLL
    for (int nt = 0; nt < 4; ++nt)
      PP_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t m = m0 + wm * 64 + mt * 16 + g + 8 * hr;
        const int64_t c = c0 + wn * 32 + nt * 8 + 2 * t;
        if (m >= M) continue;
        const float v0 = acc[mt][nt][2 * hr], v1 = acc[mt][nt][2 * hr + 1];
        float* dst = C + m * Nc + c;
        if ((Nc & 1) == 0) {  // c even: c < Nc implies c + 1 < Nc, 8-byte aligned
          if (c < Nc) *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
          if (c < Nc) dst[0] = v0;
          if (c + 1 < Nc) dst[1] = v1;
        }
      }
}

constexpr int kSimtB = 64, kSimtBK = 16, kSimtThreads = 256;

constexpr size_t kSimtSmem = size_t(2) * kSimtBK * kSimtB * sizeof(float);

PP_GLOBAL void PP_LAUNCH_BOUNDS(256) grouped_atb_simt_kernel(const GroupedAtbParams p) {
  PP_DYNAMIC_SMEM(smem_raw);
  float (*sA)[kSimtB] = reinterpret_cast<float (*)[kSimtB]>(smem_raw);
  float (*sB)[kSimtB] = sA + kSimtBK;
  const int tid = int(threadIdx.x), ty = tid >> 4, tx = tid & 15;
  const int64_t s = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * kSimtB, c0 = int64_t(blockIdx.x) * kSimtB;
  const int64_t M = p.M, Nc = p.Nc, N = p.N;
  const int64_t a_col = (p.a_off ? p.a_off[s] : 0) + m0, b_col = (p.b_off ? p.b_off[s] : 0) + c0;
  float acc[4][4] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kSimtBK) {
    PP_UNROLL
    for (int it = 0; it < kSimtBK * kSimtB / kSimtThreads; ++it) {
      const int idx = tid + it * kSimtThreads, rr = idx / kSimtB, cc = idx % kSimtB;
      const int64_t n = n0 + rr;
      sA[rr][cc] = (n < N && m0 + cc < M) ? load_any(p.a, n * p.a_row_stride + a_col + cc, p.a_dtype) : 0.f;
      sB[rr][cc] = (n < N && c0 + cc < Nc) ? load_any(p.b, n * p.b_row_stride + b_col + cc, p.b_dtype) : 0.f;
    }
    __syncthreads();
    PP_UNROLL
    for (int k = 0; k < kSimtBK; ++k) {
      float av[4], bv[4];
      PP_UNROLL
      for (int i = 0; i < 4; ++i) av[i] = sA[k][ty * 4 + i];
      PP_UNROLL
      for (int j = 0; j < 4; ++j) bv[j] = sB[k][tx * 4 + j];
      PP_UNROLL
      for (int i = 0; i < 4; ++i)
        PP_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  float* C = p.c + s * M * Nc;
  PP_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
    PP_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx * 4 + j;
      if (c < Nc) C[m * Nc + c] = acc[i][j];
    }
  }
}

PP_GLOBAL void PP_LAUNCH_BOUNDS(256) head_slice_apply_kernel(const SliceApplyParams p) {
  const int64_t D = p.head_dim;
  const int64_t lines = p.by_rows ? D : p.out, width = p.by_rows ? p.in : D;
  const int64_t total = p.S * lines * width;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t sl = idx / width, e = idx - sl * width;
    const int64_t s = sl / lines, line = sl - s * lines, h0 = p.heads[s] * D;
    const int64_t w = p.by_rows ? (h0 + line) * p.row_stride + e * p.col_stride
                                : line * p.row_stride + (h0 + e) * p.col_stride;
    const float delta = fmul_rn(p.alpha, load_any(p.slices, idx, p.slices_dtype));
    store_any(p.weight, w, p.weight_dtype, fadd_rn(load_any(p.weight, w, p.weight_dtype), delta));
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

unsigned blocks_for(int64_t n, int64_t tile) { return unsigned((n + tile - 1) / tile); }

}  // namespace

void grouped_atb(GroupedAtbParams p, int device, uintptr_t stream) {
  for (int dt : {p.a_dtype, p.b_dtype})
    if (dt != kF32 && dt != kBF16 && dt != kF16) fail("grouped_atb: unknown dtype code " + std::to_string(dt));
  if (p.S < 0 || p.M < 0 || p.Nc < 0 || p.N < 0) fail("grouped_atb: negative size");
  if (p.S == 0 || p.M == 0 || p.Nc == 0) return;
  if (p.S > 65535) fail("grouped_atb: more than 65535 slices in one launch");
  DeviceGuard guard(device);
  if (p.a_dtype == p.b_dtype && p.a_dtype != kF32 && p.N > 0) {
    if ((p.M + kTcBM - 1) / kTcBM > 65535) fail("grouped_atb: M too large for one launch");
    p.vec = aligned16(p.a) && aligned16(p.b) && (p.N <= 1 || (p.a_row_stride % 8 == 0 && p.b_row_stride % 8 == 0)) &&
            p.off_multiple % 8 == 0 && p.M % 8 == 0 && p.Nc % 8 == 0;
    const dim3 grid(blocks_for(p.Nc, kTcBN), blocks_for(p.M, kTcBM), unsigned(p.S));
    if (p.a_dtype == kBF16)
      launch(grouped_atb_tc_kernel<kBF16>, grid, dim3(kTcThreads), kTcSmem, stream, p, "head_slice_grad");
    else
      launch(grouped_atb_tc_kernel<kF16>, grid, dim3(kTcThreads), kTcSmem, stream, p, "head_slice_grad");
  } else {
    if ((p.M + kSimtB - 1) / kSimtB > 65535) fail("grouped_atb: M too large for one launch");
    const dim3 grid(blocks_for(p.Nc, kSimtB), blocks_for(p.M, kSimtB), unsigned(p.S));
    launch(grouped_atb_simt_kernel, grid, dim3(kSimtThreads), kSimtSmem, stream, p, "head_slice_grad");
  }
}

void head_slice_apply(SliceApplyParams p, int device, uintptr_t stream) {
  for (int dt : {p.weight_dtype, p.slices_dtype})
    if (dt != kF32 && dt != kBF16 && dt != kF16) fail("head_slice_apply: unknown dtype code " + std::to_string(dt));
  const int64_t total = p.S * (p.by_rows ? p.head_dim * p.in : p.out * p.head_dim);
  if (total <= 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = (total + 255) / 256;
  launch(head_slice_apply_kernel, dim3(unsigned(blocks < 8192 ? blocks : 8192)), dim3(256), 0, stream, p,
         "head_slice_apply");
}

}  // namespace cuda
}  // namespace pinpoint
