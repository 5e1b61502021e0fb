// Fused head-patched attention: checks, the fp32 kernel's launcher, dispatch by dtype.
// Kernels: attention_kernel.cuh (bf16/fp16 instantiations in attention_{bf16,fp16}.cu).
#include <climits>
#include <cstdlib>

#include "attention_kernel.cuh"

namespace pinpoint {
namespace cuda {
namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// A stride that never multiplies a nonzero index (size-1 dim) does not matter.
bool stride_ok(int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; }

template <int DC>
void launch_f32_dc(const AttentionParams& p, uintptr_t stream) {
  using Cfg = AttnF32Config;
  const dim3 grid(unsigned(p.R * p.Hq), unsigned((p.Tq + Cfg::kQB - 1) / Cfg::kQB));
  launch(attention_f32_kernel<DC>, grid, dim3(Cfg::kThreads), Cfg::smem_bytes(int(p.D)), stream, p,
         "head_patched_attention");
}

void launch_f32(const AttentionParams& p, uintptr_t stream) {
  switch ((p.D + 31) / 32) {
    case 1: return launch_f32_dc<1>(p, stream);
    case 2: return launch_f32_dc<2>(p, stream);
    case 3: return launch_f32_dc<3>(p, stream);
    case 4: return launch_f32_dc<4>(p, stream);
    case 5: return launch_f32_dc<5>(p, stream);
    case 6: return launch_f32_dc<6>(p, stream);
    case 7: return launch_f32_dc<7>(p, stream);
    default: return launch_f32_dc<8>(p, stream);
  }
}

}  // namespace

void head_patched_attention(AttentionParams p, int device, uintptr_t stream) {
  if (p.dtype != kF32 && p.dtype != kBF16 && p.dtype != kF16)
    fail("head_patched_attention: unknown dtype code " + std::to_string(p.dtype));
  if (p.D < 1 || p.D > kMaxHeadDim)
    fail("head_patched_attention: head_dim " + std::to_string(p.D) + " is not supported by the CUDA "
         "kernels (1.." + std::to_string(kMaxHeadDim) + "); use backend='triton' or 'reference'");
  if (p.Hkv < 1 || p.Hq % p.Hkv != 0) fail("head_patched_attention: Hq must be a multiple of Hkv");
  if (p.Tq > p.Tk) fail("head_patched_attention: Tq > Tk");
  if (p.R * p.Hq > INT_MAX) fail("head_patched_attention: too many (row, head) pairs for one launch");
  if ((p.Tq + 15) / 16 > 65535) fail("head_patched_attention: too many query tokens for one launch");
  if (p.patch && !p.patch_index) fail("head_patched_attention: patch without patch_index");
  if (p.R == 0 || p.Tq == 0 || p.Hq == 0) return;

  p.scale_log2 = p.scale * 1.4426950408889634f;
  p.vec = p.D % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) &&
          stride_ok(p.q_stride[0], p.R) && stride_ok(p.q_stride[1], p.Tq) && stride_ok(p.q_stride[2], p.Hq) &&
          stride_ok(p.k_stride[0], p.Rk) && stride_ok(p.k_stride[1], p.Tk) && stride_ok(p.k_stride[2], p.Hkv) &&
          stride_ok(p.v_stride[0], p.Rk) && stride_ok(p.v_stride[1], p.Tk) && stride_ok(p.v_stride[2], p.Hkv);

  const char* variant = std::getenv("PINPOINT_CUDA_ATTN_VARIANT");
  p.variant = variant ? std::atoi(variant) : 0;

  DeviceGuard guard(device);
  if (p.dtype == kF32) launch_f32(p, stream);
  else if (p.dtype == kBF16) launch_attention_bf16(p, stream);
  else launch_attention_fp16(p, stream);
}

}  // namespace cuda
}  // namespace pinpoint
