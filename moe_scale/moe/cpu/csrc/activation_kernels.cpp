// ReLU forward and backward in place, on the bit patterns (see moe_scale/moe/cpu/kernels.py).
//
// ATen's bfloat16 relu_ and threshold_backward convert every element to float32 and back;
// these test the sign and NaN bits of the raw 16- or 32-bit pattern instead, with no conversion
// (benchmarks/cpu_kernels.py compares them). The results equal ATen's: a value is kept when it
// is > 0 or NaN (relu propagates NaN; threshold_backward keeps the gradient where the input is
// NaN), else it becomes +0.

#include <ATen/Parallel.h>

#include "cpu_common.h"

using namespace moe_scale;

namespace {

constexpr int64_t kGrain = 1 << 15;

inline bool keep(int16_t bits) { return bits > 0 || (bits & 0x7FFF) > 0x7F80; }
inline bool keep(int32_t bits) { return bits > 0 || (bits & 0x7FFFFFFF) > 0x7F800000; }

template <typename I>
void relu_range(I* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = keep(x[i]) ? x[i] : I(0);
}

template <typename I>
void relu_backward_range(I* __restrict g, const I* __restrict a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = keep(a[i]) ? g[i] : I(0);
}

template <typename I>
void relu_all(I* x, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { relu_range<I>(x + b, e - b); });
}

template <typename I>
void relu_backward_all(I* g, const I* a, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { relu_backward_range<I>(g + b, a + b, e - b); });
}

void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

}  // namespace

// x = relu(x), in place.
void relu_(at::Tensor x) {
  check_flat(x, "x");
  if (is_bf16(x))
    relu_all(reinterpret_cast<int16_t*>(x.data_ptr()), x.numel());
  else
    relu_all(reinterpret_cast<int32_t*>(x.data_ptr()), x.numel());
}

// grad = grad where out > 0 (or NaN) else 0, in place; out is relu's output (or input).
void relu_backward_(at::Tensor grad, at::Tensor out) {
  check_flat(grad, "grad");
  check_flat(out, "out");
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(),
              "grad and out must match in shape and dtype");
  if (is_bf16(grad))
    relu_backward_all(reinterpret_cast<int16_t*>(grad.data_ptr()), reinterpret_cast<const int16_t*>(out.data_ptr()),
                      grad.numel());
  else
    relu_backward_all(reinterpret_cast<int32_t*>(grad.data_ptr()), reinterpret_cast<const int32_t*>(out.data_ptr()),
                      grad.numel());
}
