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
// Accumulation is in float32 (float64 tensors use the eager path). Masks use -FLT_MAX, never
// -inf, so -ffast-math (which lets gcc call glibc's vector expf) cannot change the results.

#include <ATen/Parallel.h>

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

template <typename T>
void forward_block(const T* __restrict logits, T* __restrict prob, int64_t E, int64_t k, bool renormalize, int rows,
                   float* __restrict tb, float* __restrict weight, int64_t* __restrict top_idx, int64_t rs,
                   int64_t cs, float* __restrict lse, float* __restrict col_acc) {
  load_lanes<T>(logits, E, rows, tb);
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
template <typename T, bool FromLogits>
void backward_block(const T* src, const float* __restrict g_prob, const float* __restrict lse, float g_lse_sq,
                    const ChoiceArrays& ch, int64_t r0, bool renormalize, T* grad, int rows, int64_t E, int64_t k,
                    float* __restrict tb) {
  load_lanes<T>(src, E, rows, tb);
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
