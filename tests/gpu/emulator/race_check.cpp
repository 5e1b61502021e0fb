// Sanitizer runs of the CUDA kernels in the emulator, without Python.
//
// Runs each kernel family on small random inputs with every CUDA thread as a host thread
// (PP_EMU_THREADS=os) in both cp.async modes. Under ThreadSanitizer it reports any pair of
// shared-memory accesses that no __syncthreads / warp collective orders (a missing barrier
// on the GPU); under AddressSanitizer any read or write past a tensor (inputs are exact-size
// heap arrays) or past the shared-memory allocation.
// Build and run: python tests/gpu/emulator/build.py --race-check / --bounds-check
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/dtypes.h"
#include "cuda/launch.h"

using namespace pinpoint::cuda;

namespace {

std::mt19937 rng(0);

std::vector<uint16_t> rand16(size_t n, bool bf16) {
  std::normal_distribution<float> nd;
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = bf16 ? pinpoint::float_to_bf16(nd(rng)) : pinpoint::float_to_fp16(nd(rng));
  return v;
}
std::vector<float> rand32(size_t n) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

void attention(int dtype, int64_t R, int64_t T, int64_t H, int64_t D, bool pad, bool mask) {
  const size_t n = size_t(R * T * H * D);
  std::vector<uint16_t> q16, k16, v16;
  std::vector<float> q32, k32, v32;
  const void *q, *k, *v;
  if (dtype == 0) {
    q32 = rand32(n); k32 = rand32(n); v32 = rand32(n);
    q = q32.data(); k = k32.data(); v = v32.data();
  } else {
    q16 = rand16(n, dtype == 1); k16 = rand16(n, dtype == 1); v16 = rand16(n, dtype == 1);
    q = q16.data(); k = k16.data(); v = v16.data();
  }
  std::vector<float> out(n);  // big enough for any dtype
  std::vector<int64_t> kv_index(static_cast<size_t>(R)), patch_index(static_cast<size_t>(R), 0);
  for (int64_t r = 0; r < R; ++r) kv_index[size_t(r)] = r;
  std::vector<uint8_t> head_mask(size_t(R * H), 0), key_valid(size_t(R * T), 1);
  if (mask) head_mask[0] = 1;
  if (pad)
    for (int64_t j = 0; j < T / 3; ++j) key_valid[size_t(j)] = 0;
  std::vector<float> patch = rand32(size_t(T * H * D));
  AttentionParams p{};
  p.q = q; p.k = k; p.v = v; p.out = out.data(); p.dtype = dtype;
  p.R = R; p.Rk = R; p.Tq = T; p.Tk = T; p.Hq = H; p.Hkv = H; p.D = D;
  const int64_t st[3] = {T * H * D, H * D, D};
  for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = st[i];
  p.kv_index = kv_index.data();
  p.head_mask = head_mask.data();
  p.key_valid = pad ? key_valid.data() : nullptr;
  p.patch = patch.data(); p.patch_dtype = 0; p.patch_index = patch_index.data();
  p.patch_stride[0] = T * H * D; p.patch_stride[1] = H * D; p.patch_stride[2] = D; p.patch_stride[3] = 1;
  p.scale = 0.125f; p.causal = true;
  head_patched_attention(p, -1, 0);
  std::printf("attention dtype=%d R=%ld T=%ld H=%ld D=%ld ok\n", dtype, long(R), long(T), long(H), long(D));
}

void grad(int dtype, int64_t N, int64_t M, int64_t Nc) {
  std::vector<uint16_t> a16, b16;
  std::vector<float> a32, b32;
  const void *a, *b;
  if (dtype == 0) {
    a32 = rand32(size_t(N * M)); b32 = rand32(size_t(N * Nc)); a = a32.data(); b = b32.data();
  } else {
    a16 = rand16(size_t(N * M), dtype == 1); b16 = rand16(size_t(N * Nc), dtype == 1);
    a = a16.data(); b = b16.data();
  }
  std::vector<float> c(size_t(M * Nc));
  GroupedAtbParams g{};
  g.a = a; g.a_dtype = dtype; g.a_row_stride = M; g.a_cols = M;
  g.b = b; g.b_dtype = dtype; g.b_row_stride = Nc; g.b_cols = Nc;
  g.N = N; g.S = 1; g.M = M; g.Nc = Nc; g.off_multiple = 8; g.c = c.data();
  grouped_atb(g, -1, 0);
  std::printf("grouped_atb dtype=%d N=%ld M=%ld Nc=%ld ok\n", dtype, long(N), long(M), long(Nc));
}

}  // namespace

int main() {
  for (const char* variant : {"1", "2", "3", "4"}) {  // every tile configuration at D = 128
    setenv("PINPOINT_CUDA_ATTN_VARIANT", variant, 1);
    std::printf("variant %s: ", variant);
    attention(1, 1, 150, 1, 128, true, false);
  }
  unsetenv("PINPOINT_CUDA_ATTN_VARIANT");
  attention(1, 1, 130, 1, 64, true, false);   // 3 query tiles, 3 key tiles, padding
  attention(2, 1, 70, 1, 128, false, false);
  attention(1, 1, 40, 1, 256, false, false);  // Q read from shared memory every tile
  attention(1, 2, 19, 2, 24, true, true);     // DP = 32 > D, a patched head
  attention(2, 1, 21, 1, 20, false, false);   // D % 8 != 0: element loads
  attention(1, 1, 9, 1, 200, false, false);   // DP = 256 > D, BN = 32
  attention(0, 1, 40, 2, 64, true, true);     // fp32 kernel + a patched head
  attention(0, 1, 37, 1, 33, false, false);   // fp32, odd D
  grad(1, 70, 128, 136);
  grad(2, 33, 24, 40);                        // partial tiles
  grad(1, 9, 20, 12);                         // M % 8 != 0: element loads
  grad(0, 40, 70, 65);
  std::printf("race check done\n");
  return 0;
}
