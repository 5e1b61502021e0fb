// Scalar conversions for the dtype codes pinpoint_kernels passes across the boundary.
// No libtorch: bf16/fp16 are handled as raw 16-bit patterns, rounded to nearest even
// exactly as torch rounds, so CPU results match the reference bit for bit on the cast.
#pragma once
#include <cstdint>
#include <cstring>

namespace pinpoint {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    exp = 127 - 15 + 1;  // subnormal: normalise the mantissa
    while (!(mant & 0x400u)) { mant <<= 1; --exp; }
    return bits_to_float(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// Round-to-nearest-even float -> half (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_fp16(float f) {
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16max) {
    o = (u > f32infty) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {
    float ff = bits_to_float(u) + bits_to_float(denorm_magic);
    o = uint16_t(float_to_bits(ff) - denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = uint16_t(u >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

inline float load(const void* base, int64_t i, int dtype) {
  switch (dtype) {
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

inline void store(void* base, int64_t i, int dtype, float x) {
  switch (dtype) {
    case kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(x); break;
    case kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

// n contiguous-by-stride elements -> fp32, for staging rows once before the hot loops.
inline void load_row(const void* base, int64_t start, int64_t stride, int64_t n, int dtype,
                     float* dst) {
  if (dtype == kFloat32 && stride == 1) {
    std::memcpy(dst, static_cast<const float*>(base) + start, size_t(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = load(base, start + i * stride, dtype);
}

}  // namespace pinpoint
