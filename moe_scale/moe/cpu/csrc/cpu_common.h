// Shared helpers of the fused CPU kernels (see moe_scale/moe/cpu/kernels.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace moe_scale {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest even, as c10::BFloat16 does for finite values; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n);

template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

template <>
inline void load_row<uint16_t>(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }

template <typename T>
inline void store(T* dst, int64_t i, float v);

template <>
inline void store<float>(float* dst, int64_t i, float v) { dst[i] = v; }

template <>
inline void store<uint16_t>(uint16_t* dst, int64_t i, float v) { dst[i] = float_to_bf16(v); }

// float32 / bfloat16 tensors as the raw element types the kernels are written for.
template <typename T>
inline T* data(const at::Tensor& t);

template <>
inline float* data<float>(const at::Tensor& t) { return t.data_ptr<float>(); }

template <>
inline uint16_t* data<uint16_t>(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2, name, " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

}  // namespace moe_scale
