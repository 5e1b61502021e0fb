// Shared device helpers for pinpoint's CUDA kernels: dtype conversions, tensor-core and
// async-copy primitives (inline PTX, sm_80+), warp shuffles and the launch/error plumbing.
//
// The kernels are written against this header only, so that the very same kernel source
// also compiles as plain C++ for a host-side warp emulator (tests/gpu/emulator): there,
// PINPOINT_CUDA_EMULATE is defined and every primitive below comes from "pp_emu.h", which
// runs each CUDA thread as a host thread and implements ldmatrix/mma/cp.async/shuffles with
// the fragment layouts of the PTX ISA. Production builds (nvcc) never see the emulator.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"

#if defined(__CUDACC__) && !defined(PINPOINT_CUDA_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PP_DEVICE __device__ __forceinline__
#define PP_GLOBAL __global__
#define PP_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define PP_RESTRICT __restrict__
#define PP_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#define PP_UNROLL _Pragma("unroll")
#else
#include "pp_emu.h"  // defines the PP_* macros, threadIdx & co. and the emulated primitives
#endif

namespace pinpoint {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ----------------------------------------------------------------------------------------
// Scalar conversions. 16-bit values travel as raw uint16_t bit patterns; DT selects bf16/fp16.
#if defined(__CUDACC__) && !defined(PINPOINT_CUDA_EMULATE)

template <int DT> PP_DEVICE float to_float(uint16_t x);
template <> PP_DEVICE float to_float<kBF16>(uint16_t x) { return __uint_as_float(uint32_t(x) << 16); }
template <> PP_DEVICE float to_float<kF16>(uint16_t x) { return __half2float(__ushort_as_half(x)); }

template <int DT> PP_DEVICE uint16_t from_float(float x);
template <> PP_DEVICE uint16_t from_float<kBF16>(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
template <> PP_DEVICE uint16_t from_float<kF16>(float x) { return __half_as_ushort(__float2half_rn(x)); }

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half (the
// element with the smaller index, as mma/ldmatrix fragments expect).
template <int DT> PP_DEVICE uint32_t pack2(float lo, float hi);
template <> PP_DEVICE uint32_t pack2<kBF16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> PP_DEVICE uint32_t pack2<kF16>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x, fast (MUFU); exact 0 for -inf.
PP_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

PP_DEVICE float fadd_rn(float a, float b) { return __fadd_rn(a, b); }
PP_DEVICE float fmul_rn(float a, float b) { return __fmul_rn(a, b); }

PP_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PP_DEVICE float shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }

PP_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix .x4: lanes 8j..8j+7 give the row addresses of matrix j (8 rows of 8 b16 each,
// 16-byte aligned); register j of lane l receives row l/4, elements 2*(l%4) and 2*(l%4)+1
// of matrix j (of its transpose with .trans).
PP_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
PP_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// D = A·B + D for one m16n8k16 tile, fp32 accumulators, A row-major, B "col" (k-pairs).
template <int DT> PP_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> PP_DEVICE void mma_16816<kBF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> PP_DEVICE void mma_16816<kF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy, asynchronous; !valid writes 16 zero bytes and reads nothing
// (src must still be a valid pointer).
PP_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
PP_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> PP_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else  // host emulation: the same helpers on top of pp_emu.h

template <int DT> inline float to_float(uint16_t x) {
  return DT == kBF16 ? emu::bf16_to_float(x) : emu::fp16_to_float(x);
}
template <int DT> inline uint16_t from_float(float x) {
  return DT == kBF16 ? emu::float_to_bf16(x) : emu::float_to_fp16(x);
}
template <int DT> inline uint32_t pack2(float lo, float hi) {
  return uint32_t(from_float<DT>(lo)) | (uint32_t(from_float<DT>(hi)) << 16);
}
inline float fast_exp2(float x) { return emu::exp2_approx(x); }
inline float fadd_rn(float a, float b) { return emu::fadd_rn(a, b); }
inline float fmul_rn(float a, float b) { return emu::fmul_rn(a, b); }
inline float shfl_xor(float v, int mask) { return emu::shfl_xor(v, mask); }
inline float shfl_idx(float v, int src) { return emu::shfl_idx(v, src); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, true); }
template <int DT> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(d, a, b0, b1, DT == kBF16);
}
inline void cp_async_16(void* dst, const void* src, bool valid) { emu::cp_async_16(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { emu::cp_async_wait(N); }

#endif

// ----------------------------------------------------------------------------------------
// Runtime-dtype element access (patch copies, slice updates, the fp32/mixed GEMM path).
PP_DEVICE float load_any(const void* base, int64_t i, int dtype) {
  if (dtype == kBF16) return to_float<kBF16>(static_cast<const uint16_t*>(base)[i]);
  if (dtype == kF16) return to_float<kF16>(static_cast<const uint16_t*>(base)[i]);
  return static_cast<const float*>(base)[i];
}
PP_DEVICE void store_any(void* base, int64_t i, int dtype, float x) {
  if (dtype == kBF16) static_cast<uint16_t*>(base)[i] = from_float<kBF16>(x);
  else if (dtype == kF16) static_cast<uint16_t*>(base)[i] = from_float<kF16>(x);
  else static_cast<float*>(base)[i] = x;
}

PP_DEVICE float warp_max(float v) {
  PP_UNROLL
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}
PP_DEVICE float warp_sum(float v) {
  PP_UNROLL
  for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

// ----------------------------------------------------------------------------------------
// Host side: device guard, launch, error check.
[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("pinpoint_kernels._cuda: " + what);
}

#if defined(__CUDACC__) && !defined(PINPOINT_CUDA_EMULATE)

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    fail(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device afterwards: this
// module links its own (static) CUDA runtime, which shares the thread's current context with
// torch's, so leaving another device current would silently move torch's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device >= 0 && device != prev_) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem, uintptr_t stream,
                   const P& params, const char* name) {
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          (std::string(name) + ": cudaFuncSetAttribute(max dynamic shared memory)").c_str());
  kernel<<<grid, block, smem, reinterpret_cast<cudaStream_t>(stream)>>>(params);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    fail(std::string(name) + " kernel launch failed (grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", " + std::to_string(block.x) +
         " threads, " + std::to_string(smem) + " B shared memory): " + cudaGetErrorName(err) +
         ": " + cudaGetErrorString(err));
}

#else

class DeviceGuard {
 public:
  explicit DeviceGuard(int) {}
};

template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem, uintptr_t,
                   const P& params, const char*) {
  emu::launch(grid, block, smem, [&] { kernel(params); });
}

#endif

}  // namespace cuda
}  // namespace pinpoint
