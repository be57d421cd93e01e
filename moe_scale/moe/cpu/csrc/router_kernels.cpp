// Fused CPU kernels for the softmax top-k router (see moe_scale/moe/cpu_kernels.py).
//
// Eager PyTorch spends several passes over each [C, E] logit block (convert, segment maxima,
// top-k bookkeeping, softmax, column sums, store) and as many small dispatches per chunk. At
// thousands of experts and d = 64 these cost more than the router GEMM itself. Here each row
// is read once into a float row buffer that stays in L1, and every statistic comes from it:
//
//   forward   top-k (best first, ties to the lowest index, as torch.max) and its combine
//             weights, the row's log-sum-exp, the probabilities p = softmax(row) written in
//             the output dtype, and the column sums of p (per-thread partial sums, added at
//             the end); with few experts 16 rows at a time, one per vector lane
//   backward  grad = p * (g_p + coef) with coef = 2 g_z lse - <p, g_p> - shift, plus the
//             sparse gradient of the chosen logits (both from the combine weights and their
//             gradients), written in the output dtype
//
// With few experts (router_forward_gemm / router_backward_gemm, below) the router's GEMMs run
// inside the same block kernels.
//
// Accumulation is in float32 (float64 tensors use the eager path). Masks use -FLT_MAX, never
// -inf, so -ffast-math (which lets gcc call glibc's vector expf) cannot change the results.

#include <ATen/Parallel.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "cpu_common.h"


#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

using namespace moe_scale;

namespace {

inline float row_max(const float* row, int64_t n) {
  float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = row[i] > m ? row[i] : m;
  return m;
}

// First index holding `value` (it is in the row): blocks of 16 are tested with vector
// compares, only the block that holds it is scanned element by element.
inline int64_t first_index_of(const float* __restrict row, int64_t n, float value) {
  constexpr int64_t kBlock = 16;
  int64_t b = 0;
  for (; b + kBlock <= n; b += kBlock) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = b; i < b + kBlock; ++i) hit |= row[i] == value;
    if (hit) break;
  }
  for (int64_t i = b; i < n; ++i)
    if (row[i] == value) return i;
  return n - 1;  // not reached: `value` was taken from the row
}

// exp(x) for x <= 0 (a logit minus its row max), relative error ~2e-7: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial for exp(r), 2^n built in the
// exponent bits. Written so gcc vectorises it; glibc's vector expf is exact to 1 ulp and took
// most of the forward kernel's time. Below -87 (exp < 1.7e-38) the result is that tiny value.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The row in float32 and its maximum, in one pass.
template <typename T>
inline float load_row_max(const T* __restrict src, float* __restrict dst, int64_t n) {
  float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(src[i]);
    dst[i] = v;
    m = v > m ? v : m;
  }
  return m;
}

// p = exp(logit - lse) into dst, returning <p, g>, in one pass.
template <typename T>
inline float load_exp_dot(const T* __restrict src, float* __restrict dst, int64_t n, float lse,
                          const float* __restrict g) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float p = exp_nonpositive(to_float(src[i]) - lse);
    dst[i] = p;
    acc += p * g[i];
  }
  return acc;
}

// Row kernels take plain pointers (no lambda captures: gcc turned captured pointers inside
// `omp simd` loops into gathers, 4x slower).
inline void exp_shift_(float* __restrict x, int64_t n, float m, float& sum_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = exp_nonpositive(x[i] - m);
    sum += x[i];
  }
  sum_out = sum;
}

template <typename T>
inline void scale_store_accumulate(const float* __restrict x, int64_t n, float inv, T* __restrict out,
                                   float* __restrict col_sum) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float p = x[i] * inv;
    store<T>(out, i, p);
    col_sum[i] += p;
  }
}

inline void scale_accumulate(const float* __restrict x, int64_t n, float inv, float* __restrict col_sum) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) col_sum[i] += x[i] * inv;
}

// The combine weights of a row's top-k: the softmax over the k top logits (renormalize), or
// their full-softmax probabilities exp(top - lse).
inline void top_weights(const float* top_val, int64_t k, float lse, bool renormalize, float* weight) {
  if (!renormalize) {
    for (int64_t j = 0; j < k; ++j) weight[j] = exp_nonpositive(top_val[j] - lse);
    return;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < k; ++j) sum += (weight[j] = exp_nonpositive(top_val[j] - top_val[0]));
  for (int64_t j = 0; j < k; ++j) weight[j] /= sum;
}

// `weight` and `top_idx` point at the row's first choice; choice j is `cs` elements further.
template <typename T>
void forward_row(const T* __restrict logits, T* __restrict prob, int64_t E, int64_t k, bool renormalize,
                 float* __restrict row, float* __restrict top_val, int64_t* __restrict idx, float* __restrict w,
                 float* __restrict weight, int64_t* __restrict top_idx, int64_t cs, float* __restrict lse,
                 float* __restrict col_sum) {
  // top-k: k rounds of (max, first index of it); each chosen entry is set to -FLT_MAX for the
  // later rounds and restored afterwards. The first max comes with the load.
  for (int64_t j = 0; j < k; ++j) {
    top_val[j] = j == 0 ? load_row_max<T>(logits, row, E) : row_max(row, E);
    idx[j] = first_index_of(row, E, top_val[j]);
    row[idx[j]] = -FLT_MAX;
  }
  for (int64_t j = 0; j < k; ++j) row[idx[j]] = top_val[j];
  float sum;
  exp_shift_(row, E, top_val[0], sum);
  if (prob)
    scale_store_accumulate<T>(row, E, 1.f / sum, prob, col_sum);
  else
    scale_accumulate(row, E, 1.f / sum, col_sum);
  *lse = top_val[0] + std::log(sum);
  top_weights(top_val, k, *lse, renormalize, w);
  for (int64_t j = 0; j < k; ++j) {
    weight[j * cs] = w[j];
    top_idx[j * cs] = idx[j];
  }
}

// Few experts (E <= kBlockMaxExperts, k <= 2): a row's work is a handful of instructions on
// E values, each dependent on the one before, and row by row the kernel waited on latencies
// (~90 ns a row at E = 8). Here 16 rows go at once, one per vector lane: the block is
// transposed into an [E][16] buffer, and every step (max, index, exp, sums) runs across the
// 16 rows together.
constexpr int kLanes = 16;
constexpr int64_t kBlockMaxExperts = 64;

// rows [rows, E] -> tb [E][16] in float32, one row per lane; lanes past `rows` hold 0.
template <typename T>
inline void load_lanes(const T* __restrict src, int64_t E, int rows, float* __restrict tb) {
  for (int l = 0; l < kLanes; ++l)
    for (int64_t e = 0; e < E; ++e) tb[e * kLanes + l] = l < rows ? to_float(src[l * E + e]) : 0.f;
}

// tb [E][16] -> rows [rows, E] in T, the inverse of `load_lanes`.
template <typename T>
inline void store_lanes(const float* __restrict tb, int64_t E, int rows, T* __restrict dst) {
  for (int l = 0; l < rows; ++l)
    for (int64_t e = 0; e < E; ++e) store<T>(dst, l * E + e, tb[e * kLanes + l]);
}

// The forward of 16 rows whose logits are in `tb` [E][16] (float32, one row per lane).
template <typename T>
void forward_lanes(float* __restrict tb, T* __restrict prob, int64_t E, int64_t k, bool renormalize, int rows,
                   float* __restrict weight, int64_t* __restrict top_idx, int64_t rs, int64_t cs,
                   float* __restrict lse, float* __restrict col_acc) {
  float m1[kLanes], m2[kLanes], sum[kLanes], inv[kLanes], w1[kLanes], w2[kLanes];
  int32_t i1[kLanes], i2[kLanes];
  for (int l = 0; l < kLanes; ++l) m1[l] = m2[l] = -FLT_MAX, i1[l] = 0, i2[l] = -1, sum[l] = 0.f;
  for (int64_t e = 0; e < E; ++e) {  // first maximum: the lowest index wins ties, as torch.max
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float v = tb[e * kLanes + l];
      i1[l] = v > m1[l] ? static_cast<int32_t>(e) : i1[l];
      m1[l] = v > m1[l] ? v : m1[l];
    }
  }
  if (k == 2) {
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float v = i1[l] == e ? -FLT_MAX : tb[e * kLanes + l];
        i2[l] = v > m2[l] ? static_cast<int32_t>(e) : i2[l];
        m2[l] = v > m2[l] ? v : m2[l];
      }
    }
  }
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float p = exp_nonpositive(tb[e * kLanes + l] - m1[l]);
      tb[e * kLanes + l] = p;
      sum[l] += p;
    }
  }
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    inv[l] = l < rows ? 1.f / sum[l] : 0.f;  // padding lanes add nothing to the column sums
    const float e2 = exp_nonpositive(m2[l] - m1[l]);
    w1[l] = renormalize ? (k == 2 ? 1.f / (1.f + e2) : 1.f) : inv[l];
    w2[l] = renormalize ? e2 / (1.f + e2) : e2 * inv[l];
  }
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float p = tb[e * kLanes + l] * inv[l];
      tb[e * kLanes + l] = p;
      col_acc[e * kLanes + l] += p;
    }
  }
  if (prob) store_lanes<T>(tb, E, rows, prob);
  for (int l = 0; l < rows; ++l) {
    lse[l] = m1[l] + std::log(sum[l]);
    weight[l * rs] = w1[l];
    top_idx[l * rs] = i1[l];
    if (k == 2) {
      weight[l * rs + cs] = w2[l];
      top_idx[l * rs + cs] = i2[l] >= 0 ? i2[l] : (i1[l] == 0 ? 1 : 0);  // every other logit was -inf / NaN
    }
  }
}

template <typename T>
void forward_block(const T* __restrict logits, T* __restrict prob, int64_t E, int64_t k, bool renormalize, int rows,
                   float* __restrict tb, float* __restrict weight, int64_t* __restrict top_idx, int64_t rs,
                   int64_t cs, float* __restrict lse, float* __restrict col_acc) {
  load_lanes<T>(logits, E, rows, tb);
  forward_lanes<T>(tb, prob, E, k, renormalize, rows, weight, top_idx, rs, cs, lse, col_acc);
}

// weight / top_idx: element (row r, choice j) at [r * rs + j * cs].
template <typename T>
void forward_rows(const T* logits, T* prob, int64_t C, int64_t E, int64_t k, bool renormalize, float* weight,
                  int64_t* top_idx, int64_t rs, int64_t cs, float* lse, float* prob_sum_partial) {
  // The column sums accumulate in the thread's own buffer, written out once: with few experts
  // the threads' rows of `prob_sum_partial` share a cache line, and updating them row by row
  // made every row a cache-line transfer between cores (the kernel took 315 us instead of
  // ~40 us for 4096 x 8 logits).
  if (E <= kBlockMaxExperts && k <= 2) {
    const int64_t blocks = (C + kLanes - 1) / kLanes;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> tb(E * kLanes), col_acc(E * kLanes, 0.f);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r = b * kLanes;
        const int rows = static_cast<int>(std::min<int64_t>(kLanes, C - r));
        forward_block<T>(logits + r * E, prob ? prob + r * E : nullptr, E, k, renormalize, rows, tb.data(),
                         weight + r * rs, top_idx + r * rs, rs, cs, lse + r, col_acc.data());
      }
      float* partial = prob_sum_partial + at::get_thread_num() * E;
      for (int64_t e = 0; e < E; ++e)
        for (int l = 0; l < kLanes; ++l) partial[e] += col_acc[e * kLanes + l];
    });
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(E), col_sum(E, 0.f), top_val(k), w(k);
    std::vector<int64_t> idx(k);
    for (int64_t r = begin; r < end; ++r)
      forward_row<T>(logits + r * E, prob ? prob + r * E : nullptr, E, k, renormalize, row.data(), top_val.data(),
                     idx.data(), w.data(), weight + r * rs, top_idx + r * rs, cs, lse + r, col_sum.data());
    float* partial = prob_sum_partial + at::get_thread_num() * E;
    for (int64_t e = 0; e < E; ++e) partial[e] += col_sum[e];
  });
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One row's logit gradient in float32 (`row` holds p on return, `g` the gradient). `src` holds
// the probabilities, or with FromLogits the logits, from which p = exp(logit - lse) is
// recomputed in the row buffer. `idx`, `weight`, `g_weight` point at the row's k choices
// (choice j `cs` elements further): the chosen experts, their combine weights and the weights'
// gradients (g_weight may be null: zero). With `renormalize` (w = softmax of the top-k logits)
// chosen logit j gets w_j (g_j - sum_i w_i g_i); otherwise (w_j = p[idx_j]) it gets w_j g_j
// and every logit -p sum_i w_i g_i.
template <typename T, bool FromLogits>
void logit_grad_row(const T* src, const float* __restrict g_prob, float lse, float g_lse_sq,
                    const int64_t* __restrict idx, const float* __restrict weight, const float* __restrict g_weight,
                    int64_t cs, bool renormalize, int64_t E, int64_t k, float* __restrict row, float* __restrict g) {
  float wg_sum = 0.f;
  if (g_weight)
    for (int64_t j = 0; j < k; ++j) wg_sum += weight[j * cs] * g_weight[j * cs];
  const float shift = renormalize ? 0.f : wg_sum;
  float p_dot_g;
  if constexpr (FromLogits) {
    p_dot_g = load_exp_dot<T>(src, row, E, lse, g_prob);
  } else {
    load_row<T>(src, row, E);
    p_dot_g = dot(row, g_prob, E);
  }
  const float coef = 2.f * g_lse_sq * lse - p_dot_g - shift;
#pragma omp simd
  for (int64_t e = 0; e < E; ++e) g[e] = row[e] * (g_prob[e] + coef);
  if (g_weight)
    for (int64_t j = 0; j < k; ++j)
      g[idx[j * cs]] += weight[j * cs] * (renormalize ? g_weight[j * cs] - wg_sum : g_weight[j * cs]);
}

// The [C, k] arrays of the backward: element (row r, choice j) at [r * rs + j * cs].
struct ChoiceArrays {
  const int64_t* idx;
  const float* weight;
  const float* g_weight;  // null: zero
  int64_t rs, cs;
};

// The logit gradients of up to 16 rows at once, one per vector lane (few experts; see
// `forward_block`): the rows are transposed into `tb` [E][16], every per-row quantity (p,
// <p, g_p>, the coefficient) is computed across the lanes, the chosen logits get their
// terms lane by lane, and the rows are transposed back into `grad`.
// In place on `tb` [E][16]: the probabilities (or with FromLogits the logits) of 16 rows in,
// their logit gradients out (lanes past `rows` are padding, their values meaningless).
template <bool FromLogits>
void logit_grad_lanes(float* __restrict tb, const float* __restrict g_prob, const float* __restrict lse,
                      float g_lse_sq, const ChoiceArrays& ch, int64_t r0, bool renormalize, int rows, int64_t E,
                      int64_t k) {
  float ls[kLanes], dot_l[kLanes], coef[kLanes], wg_sum[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    ls[l] = l < rows ? lse[l] : 0.f;
    dot_l[l] = 0.f;
    wg_sum[l] = 0.f;
    if (ch.g_weight && l < rows)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t o = (r0 + l) * ch.rs + j * ch.cs;
        wg_sum[l] += ch.weight[o] * ch.g_weight[o];
      }
  }
  for (int64_t e = 0; e < E; ++e) {
    const float gp = g_prob[e];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      float p = tb[e * kLanes + l];
      if constexpr (FromLogits) p = exp_nonpositive(p - ls[l]);
      tb[e * kLanes + l] = p;
      dot_l[l] += p * gp;
    }
  }
#pragma omp simd
  for (int l = 0; l < kLanes; ++l)
    coef[l] = 2.f * g_lse_sq * ls[l] - dot_l[l] - (renormalize ? 0.f : wg_sum[l]);
  for (int64_t e = 0; e < E; ++e) {
    const float gp = g_prob[e];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) tb[e * kLanes + l] *= gp + coef[l];
  }
  if (ch.g_weight)
    for (int l = 0; l < rows; ++l)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t o = (r0 + l) * ch.rs + j * ch.cs;
        const float gw = ch.g_weight[o];
        tb[ch.idx[o] * kLanes + l] += ch.weight[o] * (renormalize ? gw - wg_sum[l] : gw);
      }
}

template <typename T, bool FromLogits>
void backward_block(const T* src, const float* __restrict g_prob, const float* __restrict lse, float g_lse_sq,
                    const ChoiceArrays& ch, int64_t r0, bool renormalize, T* grad, int rows, int64_t E, int64_t k,
                    float* __restrict tb) {
  load_lanes<T>(src, E, rows, tb);
  logit_grad_lanes<FromLogits>(tb, g_prob, lse, g_lse_sq, ch, r0, renormalize, rows, E, k);
  store_lanes<T>(tb, E, rows, grad);  // `grad` may be `src` (the recomputed logits): all of it was read above
}

template <typename T, bool FromLogits>
void backward_rows(const T* src, const float* g_prob, const float* lse, float g_lse_sq, const ChoiceArrays& ch,
                   bool renormalize, T* grad, int64_t C, int64_t E, int64_t k) {
  if (E <= kBlockMaxExperts) {
    const int64_t blocks = (C + kLanes - 1) / kLanes;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> tb(E * kLanes);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r = b * kLanes;
        const int rows = static_cast<int>(std::min<int64_t>(kLanes, C - r));
        backward_block<T, FromLogits>(src + r * E, g_prob, lse + r, g_lse_sq, ch, r, renormalize, grad + r * E, rows,
                                      E, k, tb.data());
      }
    });
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(E), g(E);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * ch.rs;
      logit_grad_row<T, FromLogits>(src + r * E, g_prob, lse[r], g_lse_sq, ch.idx + o, ch.weight + o,
                                    ch.g_weight ? ch.g_weight + o : nullptr, ch.cs, renormalize, E, k, row.data(),
                                    g.data());
      // `grad` may be `src` (the recomputed logits): the row was read whole above
      T* out = grad + r * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) store<T>(out, e, g[e]);
    }
  });
}

// ------------------------------------------------------ few experts: the router GEMMs inside
//
// With few experts (E <= kGemmMaxExperts, k <= 2) the router's GEMMs, [S, d] x [d, E] forward
// and the logit gradient times W^T and x backward, are small; in a layer step the three ATen
// GEMMs and the Python around them cost far more than their arithmetic (every op meets cold
// caches: benchmarks/step_overheads.py). Here they run inside the 16-row block kernels,
// with the experts (at most 16) along one vector, and the logits and logit gradients are
// rounded to the input dtype where the ATen path rounds them (its GEMM outputs), so both paths
// compute the same function up to the order of the float32 sums. In bfloat16 on CPUs with
// AVX512-BF16 (and even d) the products take pairs of bf16 values with VDPBF16PS, as oneDNN's
// GEMMs do; otherwise float32 FMAs.

constexpr int64_t kGemmMaxExperts = 16;

using vec16 = float __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2)

inline vec16 vload(const void* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(void* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// A scratch buffer of 32-bit elements aligned to 64 bytes, zero-filled: a vector load from
// malloc's 16-byte alignment splits a cache line three times in four (the weight-gradient loop
// ran at half speed).
template <typename U>
class Aligned {
  static_assert(sizeof(U) == 4);

 public:
  explicit Aligned(int64_t n) : v_((n + 15) / 16, vec16{}) {}
  U* data() { return reinterpret_cast<U*>(v_.data()); }
  const U* data() const { return reinterpret_cast<const U*>(v_.data()); }

 private:
  std::vector<vec16> v_;
};

// The feature axis is padded to whole chunks of 8 vectors: 8 accumulators, enough independent
// FMA chains to hide their latency.
constexpr int64_t kChunk = 128;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_float(float_to_bf16(v));
  return v;
}

// rows [rows, d] of T -> xf [16][dp] float32, zero past `rows` and past d.
template <typename T>
inline void load_block_rows(const T* __restrict x, int64_t d, int rows, int64_t dp, float* __restrict xf) {
  for (int l = 0; l < kLanes; ++l) {
    float* dst = xf + l * dp;
    if (l < rows) load_row<T>(x + l * d, dst, d);
    std::fill(dst + (l < rows ? d : 0), dst + dp, 0.f);
  }
}

// acc [rows, d] as float32 chunks -> dst in T
template <typename T>
inline void store_chunk(const vec16* acc, int64_t n, T* __restrict dst) {
  alignas(64) float buf[kChunk];
  for (int j = 0; j < 8; ++j) vstore(buf + 16 * j, acc[j]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store<T>(dst, i, buf[i]);
}

// The three products in float32 FMAs, for rows of T.
template <typename T>
class Float32Gemms {
 public:
  // w [d, E] contiguous, in T
  Float32Gemms(const T* w, int64_t d, int64_t E) : d_(d), dp_(round_up(d, kChunk)), E_(E), wv_(d * 16), wt_(E * dp_) {
    for (int64_t i = 0; i < d; ++i)
      for (int64_t e = 0; e < E; ++e) wv_.data()[i * 16 + e] = wt_.data()[e * dp_ + i] = to_float(w[i * E + e]);
  }

  struct Scratch {
    explicit Scratch(const Float32Gemms& g) : xf(kLanes * g.dp_) {}
    Aligned<float> xf;
  };

  // out [16][16] = logits of the block's rows x [rows, d] (rows past `rows`: zero)
  void logits(const T* x, int rows, Scratch& s, float* __restrict out) const {
    const float* xf = s.xf.data();
    load_block_rows<T>(x, d_, rows, dp_, s.xf.data());
    for (int r0 = 0; r0 < kLanes; r0 += 8) {
      vec16 acc[8] = {};
      for (int64_t i = 0; i < d_; ++i) {
        const vec16 wv = vload(wv_.data() + i * 16);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) acc[r] += xf[(r0 + r) * dp_ + i] * wv;
      }
      for (int r = 0; r < 8; ++r) vstore(out + (r0 + r) * 16, acc[r]);
    }
  }

  // grad_x rows [rows, d] = g [E][16] (lanes) @ W^T
  void grad_x(const float* __restrict g, int rows, T* __restrict grad_x) const {
    for (int l = 0; l < rows; ++l)
      for (int64_t c = 0; c < dp_; c += kChunk) {
        vec16 acc[8] = {};
        for (int64_t e = 0; e < E_; ++e) {
          const float ge = g[e * kLanes + l];
          const float* w = wt_.data() + e * dp_ + c;
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) acc[j] += ge * vload(w + 16 * j);
        }
        store_chunk<T>(acc, std::min<int64_t>(kChunk, d_ - c), grad_x + l * d_ + c);
      }
  }

  // gw [E][dp] += g [E][16] (lanes) @ x [rows, d], over the first `rows` lanes
  void grad_w(const float* __restrict g, const T* x, int rows, Scratch& s, float* __restrict gw) const {
    load_block_rows<T>(x, d_, rows, dp_, s.xf.data());
    const float* xf = s.xf.data();
    for (int64_t e = 0; e < E_; ++e)
      for (int64_t c = 0; c < dp_; c += kChunk) {
        float* dst = gw + e * dp_ + c;
        vec16 acc[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = vload(dst + 16 * j);
        for (int l = 0; l < rows; ++l) {
          const float ge = g[e * kLanes + l];
          const float* xr = xf + l * dp_ + c;
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) acc[j] += ge * vload(xr + 16 * j);
        }
        for (int j = 0; j < 8; ++j) vstore(dst + 16 * j, acc[j]);
      }
  }

  int64_t dp() const { return dp_; }

 private:
  int64_t d_, dp_, E_;
  Aligned<float> wv_;  // [d][16]: W's rows, experts along the vector, zero past E
  Aligned<float> wt_;  // [E][dp]: W^T, zero past d
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MOE_SCALE_ROUTER_BF16 1

inline uint32_t pair(uint16_t lo, uint16_t hi) { return lo | static_cast<uint32_t>(hi) << 16; }

// The bits of a float already rounded to bfloat16 precision.
inline uint16_t bf16_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return static_cast<uint16_t>(b >> 16);
}

inline __m512 dot_pairs(__m512 acc, uint32_t a_pair, const uint32_t* b_pairs) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a_pair)),
                          (__m512bh)_mm512_loadu_si512(b_pairs));
}

// The three products with VDPBF16PS on pairs of bfloat16 values (d even), as oneDNN's bf16 GEMMs.
class Bf16Gemms {
 public:
  Bf16Gemms(const uint16_t* w, int64_t d, int64_t E)
      : d_(d), dp_(round_up(d, kChunk)), E_(E), ep_((E + 1) / 2), wv_(d / 2 * 16), wt_(ep_ * dp_) {
    auto at = [&](int64_t i, int64_t e) -> uint16_t { return e < E ? w[i * E + e] : 0; };
    for (int64_t i = 0; i < d; i += 2)
      for (int64_t e = 0; e < E; ++e) wv_.data()[i / 2 * 16 + e] = pair(at(i, e), at(i + 1, e));
    for (int64_t p = 0; p < ep_; ++p)
      for (int64_t i = 0; i < d; ++i) wt_.data()[p * dp_ + i] = pair(at(i, 2 * p), at(i, 2 * p + 1));
  }

  struct Scratch {
    explicit Scratch(const Bf16Gemms& g) : xp(kLanes / 2 * g.dp_), zero(g.d_ / 2) {}
    Aligned<uint32_t> xp;    // [8][dp]: pairs of rows (2q, 2q + 1), zero past d
    Aligned<uint32_t> zero;  // a zero row, for the block's missing rows
  };

  void logits(const uint16_t* x, int rows, Scratch& s, float* __restrict out) const {
    for (int r0 = 0; r0 < kLanes; r0 += 8) {
      const uint32_t* xr[8];
      for (int r = 0; r < 8; ++r)
        xr[r] = r0 + r < rows ? reinterpret_cast<const uint32_t*>(x + (r0 + r) * d_) : s.zero.data();
      __m512 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t ip = 0; ip < d_ / 2; ++ip) {
        const uint32_t* wv = wv_.data() + ip * 16;
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) acc[r] = dot_pairs(acc[r], xr[r][ip], wv);
      }
      for (int r = 0; r < 8; ++r) _mm512_storeu_ps(out + (r0 + r) * 16, acc[r]);
    }
  }

  // g: lanes [E][16] already rounded to bf16 precision
  void grad_x(const float* __restrict g, int rows, uint16_t* __restrict grad_x) const {
    for (int l = 0; l < rows; ++l) {
      uint32_t gp[kGemmMaxExperts / 2];
      for (int64_t p = 0; p < ep_; ++p)
        gp[p] = pair(bf16_bits(g[2 * p * kLanes + l]), 2 * p + 1 < E_ ? bf16_bits(g[(2 * p + 1) * kLanes + l]) : 0);
      for (int64_t c = 0; c < dp_; c += kChunk) {
        vec16 acc[8] = {};
        for (int64_t p = 0; p < ep_; ++p) {
          const uint32_t* w = wt_.data() + p * dp_ + c;
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) acc[j] = (vec16)dot_pairs((__m512)acc[j], gp[p], w + 16 * j);
        }
        store_chunk<uint16_t>(acc, std::min<int64_t>(kChunk, d_ - c), grad_x + l * d_ + c);
      }
    }
  }

  void grad_w(const float* __restrict g, const uint16_t* x, int rows, Scratch& s, float* __restrict gw) const {
    uint32_t* xp = s.xp.data();
    for (int q = 0; q < kLanes / 2; ++q) {
      const uint16_t* a = 2 * q < rows ? x + 2 * q * d_ : nullptr;
      const uint16_t* b = 2 * q + 1 < rows ? x + (2 * q + 1) * d_ : nullptr;
      uint32_t* dst = xp + q * dp_;
#pragma omp simd
      for (int64_t i = 0; i < d_; ++i) dst[i] = pair(a ? a[i] : 0, b ? b[i] : 0);
    }
    for (int64_t e = 0; e < E_; ++e) {
      uint32_t gq[kLanes / 2];
      for (int q = 0; q < kLanes / 2; ++q)
        gq[q] = pair(2 * q < rows ? bf16_bits(g[e * kLanes + 2 * q]) : 0,
                     2 * q + 1 < rows ? bf16_bits(g[e * kLanes + 2 * q + 1]) : 0);
      for (int64_t c = 0; c < dp_; c += kChunk) {
        float* dst = gw + e * dp_ + c;
        __m512 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm512_loadu_ps(dst + 16 * j);
        for (int q = 0; q < kLanes / 2; ++q) {
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) acc[j] = dot_pairs(acc[j], gq[q], xp + q * dp_ + c + 16 * j);
        }
        for (int j = 0; j < 8; ++j) _mm512_storeu_ps(dst + 16 * j, acc[j]);
      }
    }
  }

  int64_t dp() const { return dp_; }

 private:
  int64_t d_, dp_, E_, ep_;
  Aligned<uint32_t> wv_;  // [d/2][16]: pairs (w[2i][e], w[2i+1][e]), zero past E
  Aligned<uint32_t> wt_;  // [ceil(E/2)][dp]: pairs (w[i][2p], w[i][2p+1]), zero past d and E
};
#endif

// Per-thread partial sums of the forward, added up at the end.
struct ForwardPartials {
  ForwardPartials(int64_t threads, int64_t E) : prob_sum(threads * E), top1(threads * E), lse_sq(threads) {}
  std::vector<float> prob_sum, top1;
  std::vector<double> lse_sq;
};

// The forward of `router_forward_gemm` over rows [0, C): weight / top_idx [C, k] choice-major
// ([k, C] storage).
template <typename T, typename Gemms>
void forward_gemm_rows(const T* x, int64_t C, int64_t d, const Gemms& gemms, int64_t E, int64_t k, bool renormalize,
                       T* prob, float* weight, int64_t* top_idx, float* lse, ForwardPartials& partials) {
  const int64_t blocks = (C + kLanes - 1) / kLanes;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    typename Gemms::Scratch scratch(gemms);
    Aligned<float> logits(kLanes * 16);
    std::vector<float> tb(E * kLanes), col_acc(E * kLanes, 0.f), top1(E, 0.f);
    double lse_sq = 0.0;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = b * kLanes;
      const int rows = static_cast<int>(std::min<int64_t>(kLanes, C - r));
      float* lg = logits.data();
      gemms.logits(x + r * d, rows, scratch, lg);
#pragma omp simd
      for (int i = 0; i < kLanes * 16; ++i) lg[i] = round_to<T>(lg[i]);
      for (int64_t e = 0; e < E; ++e)
        for (int l = 0; l < kLanes; ++l) tb[e * kLanes + l] = l < rows ? lg[l * 16 + e] : 0.f;
      forward_lanes<T>(tb.data(), prob + r * E, E, k, renormalize, rows, weight + r, top_idx + r, 1, C, lse + r,
                       col_acc.data());
      for (int l = 0; l < rows; ++l) {
        lse_sq += static_cast<double>(lse[r + l]) * lse[r + l];
        top1[top_idx[r + l]] += 1.f;
      }
    }
    const int t = at::get_thread_num();
    for (int64_t e = 0; e < E; ++e) {
      for (int l = 0; l < kLanes; ++l) partials.prob_sum[t * E + e] += col_acc[e * kLanes + l];
      partials.top1[t * E + e] += top1[e];
    }
    partials.lse_sq[t] += lse_sq;
  });
}

// The backward of `router_backward_gemm`: grad_x [C, d] (or null) and per-thread partial
// weight gradients gw [threads][E][dp] (or null).
template <typename T, typename Gemms>
void backward_gemm_rows(const T* x, const T* prob, int64_t C, int64_t d, const Gemms& gemms, const float* g_prob,
                        const float* lse, float g_lse_sq, const ChoiceArrays& ch, bool renormalize, int64_t E,
                        int64_t k, T* grad_x, float* gw_partial) {
  const int64_t blocks = (C + kLanes - 1) / kLanes;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    typename Gemms::Scratch scratch(gemms);
    std::vector<float> tb(E * kLanes);
    float* gw = gw_partial ? gw_partial + at::get_thread_num() * E * gemms.dp() : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = b * kLanes;
      const int rows = static_cast<int>(std::min<int64_t>(kLanes, C - r));
      load_lanes<T>(prob + r * E, E, rows, tb.data());
      logit_grad_lanes<false>(tb.data(), g_prob, lse + r, g_lse_sq, ch, r, renormalize, rows, E, k);
      float* g = tb.data();  // as the ATen path's logit gradient, in the input dtype
#pragma omp simd
      for (int64_t i = 0; i < E * kLanes; ++i) g[i] = round_to<T>(g[i]);
      if (grad_x) gemms.grad_x(tb.data(), rows, grad_x + r * d);
      if (gw) gemms.grad_w(tb.data(), x + r * d, rows, scratch, gw);
    }
  });
}

void check_choices(const at::Tensor& idx, const at::Tensor& weight, int64_t C) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == C, "idx must be an int64 [C, k]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.sizes() == idx.sizes() && weight.strides() == idx.strides(),
              "weight must be a float32 [C, k] with idx's strides");
}

// [C, k] arrays may be strided views (the router keeps them choice-major, [k, S]), but weight,
// g_weight and idx must share their strides.
void check_statistics(const at::Tensor& g_prob, const at::Tensor& lse, const at::Tensor& idx, const at::Tensor& weight,
                      const std::optional<at::Tensor>& g_weight, int64_t C, int64_t E) {
  TORCH_CHECK(g_prob.scalar_type() == at::kFloat && g_prob.is_contiguous() && g_prob.numel() == E,
              "g_prob must be a contiguous float32 [E]");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == C,
              "lse must be a contiguous float32 [C]");
  check_choices(idx, weight, C);
  if (g_weight) {
    TORCH_CHECK(g_weight->scalar_type() == at::kFloat && g_weight->sizes() == idx.sizes() &&
                    g_weight->strides() == idx.strides(),
                "g_weight must be a float32 [C, k] with idx's strides");
  }
}

}  // namespace

// logits, prob_out: [C, E] of one dtype (float32 / bfloat16); writes prob_out unless it is None
// (the backward then recomputes the probabilities from the logits), and into weight [C, k] f32
// (see `top_weights`), top_idx [C, k] i64 (best first, ties to the lowest index; both may be
// strided views with the same strides) and lse [C] f32. Returns the probability column sums
// [E] f32.
at::Tensor router_forward(at::Tensor logits, std::optional<at::Tensor> prob_out, at::Tensor weight, at::Tensor top_idx,
                          at::Tensor lse, int64_t k, bool renormalize) {
  check_rows(logits, "logits");
  if (prob_out.has_value()) {
    check_rows(*prob_out, "prob_out");
    TORCH_CHECK(prob_out->sizes() == logits.sizes() && prob_out->scalar_type() == logits.scalar_type(),
                "prob_out must match logits in shape and dtype");
  }
  const int64_t C = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must lie in [1, E]");
  check_choices(top_idx, weight, C);
  TORCH_CHECK(top_idx.size(1) == k, "top_idx must be [C, k]");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == C,
              "lse must be a contiguous float32 [C]");
  auto partial = at::zeros({at::get_num_threads(), E}, logits.options().dtype(at::kFloat));
  auto run = [&](auto* src, auto* prob) {
    using T = std::remove_pointer_t<decltype(src)>;
    forward_rows<T>(src, prob, C, E, k, renormalize, weight.data_ptr<float>(), top_idx.data_ptr<int64_t>(),
                    top_idx.stride(0), top_idx.stride(1), lse.data_ptr<float>(), partial.data_ptr<float>());
  };
  if (is_bf16(logits))
    run(data<uint16_t>(logits), prob_out ? data<uint16_t>(*prob_out) : nullptr);
  else
    run(data<float>(logits), prob_out ? data<float>(*prob_out) : nullptr);
  return partial.sum(0);
}

// prob, grad_out: [C, E] of one dtype; g_prob [E], lse [C] f32; idx [C, k] i64 with its
// combine weights weight [C, k] f32 and their gradients g_weight (None: zero), all three with
// the same (any) strides. Writes
// grad_out. With from_logits, `prob` holds the logits instead and the probabilities are
// recomputed as exp(logit - lse); grad_out may then be the logits tensor.
void router_backward(at::Tensor prob, at::Tensor g_prob, at::Tensor lse, double g_lse_sq, at::Tensor idx,
                     at::Tensor weight, std::optional<at::Tensor> g_weight, bool renormalize, at::Tensor grad_out,
                     bool from_logits) {
  check_rows(prob, "prob");
  check_rows(grad_out, "grad_out");
  const int64_t C = prob.size(0), E = prob.size(1), k = idx.size(1);
  TORCH_CHECK(grad_out.sizes() == prob.sizes() && grad_out.scalar_type() == prob.scalar_type(),
              "grad_out must match prob in shape and dtype");
  check_statistics(g_prob, lse, idx, weight, g_weight, C, E);
  const float g_z = static_cast<float>(g_lse_sq);
  const float *gp = g_prob.data_ptr<float>(), *ls = lse.data_ptr<float>();
  const ChoiceArrays ch{idx.data_ptr<int64_t>(), weight.data_ptr<float>(),
                        g_weight ? g_weight->data_ptr<float>() : nullptr, idx.stride(0), idx.stride(1)};
  auto run = [&](auto* src, auto* out) {
    using T = std::remove_pointer_t<decltype(src)>;
    if (from_logits)
      backward_rows<T, true>(src, gp, ls, g_z, ch, renormalize, out, C, E, k);
    else
      backward_rows<T, false>(src, gp, ls, g_z, ch, renormalize, out, C, E, k);
  };
  if (is_bf16(prob))
    run(data<uint16_t>(prob), data<uint16_t>(grad_out));
  else
    run(data<float>(prob), data<float>(grad_out));
}

// run(gemms, x's rows) with the products for x [S, d] and w [d, E]: VDPBF16PS pairs for bf16
// with even d where the CPU has them, float32 FMAs otherwise.
template <typename Run>
void with_router_gemms(const at::Tensor& x, const at::Tensor& w, const Run& run) {
  const int64_t d = x.size(1), E = w.size(1);
  if (!is_bf16(x)) {
    run(Float32Gemms<float>(data<float>(w), d, E), data<float>(x));
    return;
  }
#ifdef MOE_SCALE_ROUTER_BF16
  if (d % 2 == 0) {
    run(Bf16Gemms(data<uint16_t>(w), d, E), data<uint16_t>(x));
    return;
  }
#endif
  run(Float32Gemms<uint16_t>(data<uint16_t>(w), d, E), data<uint16_t>(x));
}

// The router with its GEMMs fused in, for few experts (E <= 16, k <= 2): x [S, d] and w [d, E]
// (contiguous) of one dtype (float32 / bfloat16) -> {weight [k, S] f32 (choice-major: the
// [S, k] weights are its transpose), top_idx [k, S] i64, lse [S] f32, prob [S, E] (x's dtype),
// prob column sums [E] f32, sum of lse^2 (0-dim f32), first choices per expert [E] f32}; see
// `router_forward`.
std::vector<at::Tensor> router_forward_gemm(const at::Tensor& x, const at::Tensor& w, int64_t k, bool renormalize) {
  check_rows(x, "x");
  const int64_t S = x.size(0), d = x.size(1), E = w.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == d && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "w must be a contiguous [d, E] in x's dtype");
  TORCH_CHECK(E <= kGemmMaxExperts && k >= 1 && k <= std::min<int64_t>(2, E),
              "router_forward_gemm takes at most 16 experts and k in [1, min(2, E)]");
  const auto f32 = x.options().dtype(at::kFloat);
  auto weight = at::empty({k, S}, f32), idx = at::empty({k, S}, x.options().dtype(at::kLong));
  auto lse = at::empty({S}, f32), prob = at::empty({S, E}, x.options());
  ForwardPartials partials(at::get_num_threads(), E);
  auto run = [&](const auto& gemms, auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    forward_gemm_rows<T>(src, S, d, gemms, E, k, renormalize, data<T>(prob), weight.data_ptr<float>(),
                         idx.data_ptr<int64_t>(), lse.data_ptr<float>(), partials);
  };
  with_router_gemms(x, w, run);
  auto prob_sum = at::zeros({E}, f32), top1 = at::zeros({E}, f32);
  double lse_sq = 0.0;
  for (size_t t = 0; t < partials.lse_sq.size(); ++t) {
    lse_sq += partials.lse_sq[t];
    for (int64_t e = 0; e < E; ++e) {
      prob_sum.data_ptr<float>()[e] += partials.prob_sum[t * E + e];
      top1.data_ptr<float>()[e] += partials.top1[t * E + e];
    }
  }
  return {weight, idx, lse, prob, prob_sum, at::scalar_tensor(lse_sq, f32), top1};
}

// Gradients of `router_forward_gemm`: x, w, prob as saved; g_prob [E], lse [S] f32; idx,
// weight, g_weight (None: zero) [S, k] with one set of strides; -> {grad_x [S, d] (undefined
// unless need_x), grad_w [d, E] in w's dtype (undefined unless need_w)}.
std::vector<at::Tensor> router_backward_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& prob,
                                             const at::Tensor& g_prob, const at::Tensor& lse, double g_lse_sq,
                                             const at::Tensor& idx, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& g_weight, bool renormalize,
                                             bool need_x, bool need_w) {
  check_rows(x, "x");
  check_rows(prob, "prob");
  const int64_t S = x.size(0), d = x.size(1), E = w.size(1), k = idx.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == d && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "w must be a contiguous [d, E] in x's dtype");
  TORCH_CHECK(E <= kGemmMaxExperts && prob.size(0) == S && prob.size(1) == E && prob.scalar_type() == x.scalar_type(),
              "prob must be [S, E] in x's dtype with E <= 16");
  check_statistics(g_prob, lse, idx, weight, g_weight, S, E);
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  std::vector<float> gw;
  int64_t dp = 0;
  const ChoiceArrays ch{idx.data_ptr<int64_t>(), weight.data_ptr<float>(),
                        g_weight ? g_weight->data_ptr<float>() : nullptr, idx.stride(0), idx.stride(1)};
  auto run = [&](const auto& gemms, auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    dp = gemms.dp();
    if (need_w) gw.assign(threads * E * dp, 0.f);
    backward_gemm_rows<T>(src, data<T>(prob), S, d, gemms, g_prob.data_ptr<float>(), lse.data_ptr<float>(),
                          static_cast<float>(g_lse_sq), ch, renormalize, E, k, need_x ? data<T>(grad_x) : nullptr,
                          need_w ? gw.data() : nullptr);
  };
  with_router_gemms(x, w, run);
  at::Tensor grad_w;
  if (need_w) {  // [d, E] = the threads' [E][dp] partials summed and transposed
    std::vector<float> sum(d * E, 0.f);
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < d; ++i) sum[i * E + e] += gw[(t * E + e) * dp + i];
    grad_w = at::empty({d, E}, w.options());
    auto out = [&](auto* dst) {
      using T = std::remove_pointer_t<decltype(dst)>;
      for (int64_t i = 0; i < d * E; ++i) store<T>(dst, i, sum[i]);
    };
    is_bf16(w) ? out(data<uint16_t>(grad_w)) : out(data<float>(grad_w));
  }
  return {grad_x, grad_w};
}
