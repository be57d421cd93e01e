// Expert-parallel forward and backward of the fused grouped MLP (see `_FusedMLP` in
// moe_scale/moe/cpu/grouped_mlp.py, which runs the same spans one after another from Python).
//
// The spans come in groups whose rows no other group touches (see `_SpanSchedule`: neighbouring
// experts for bucketed spans, a balanced partition of the experts for exact ones, an expert too
// large for any partition split in two; a split expert's pieces write float32 partial weight
// gradients, summed once every group is done). Each group runs on one thread, its GEMMs
// single-threaded, so a thread keeps its expert's blocks in its own cache and no GEMM splits
// its rows across cores (benchmarks/moe_layer.py compares it with multi-threaded GEMMs and one
// padded `bmm`). Inside a group the spans run in the order given, which is what makes bucketed
// spans exact (a span's rows that belong to a lower expert are rewritten by that expert later,
// in the same thread).
//
// Every product is the one the Python loop makes, on the same rows, so the two paths compute
// the same function. In bfloat16 on CPUs with AVX512-BF16 (`native`, Python's `native_gemm`)
// the products run on bf16_gemm.cpp instead of ATen's oneDNN GEMMs, with ReLU and its backward
// fused in.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>

#include "bf16_gemm.h"
#include "cpu_common.h"

#include <algorithm>
#include <exception>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

void relu_(at::Tensor x);
void relu_backward_(at::Tensor grad, at::Tensor out);

using namespace moe_scale;

namespace {

enum Activation : int64_t { kReLU = 0, kGELU = 1, kSwiGLU = 2 };

struct Span {
  // expert e owns rows [s, end) and computes over [lo, hi): Python's `Span` (expert,
  // gemm_start, gemm_end, own_start, own_end)
  int64_t e, lo, hi, s, end;
  int64_t part;               // -1, or the partial-gradient slot of a piece of a split expert
};

// spans [n, 5] or [n, 6] (the 6th column: part, see `_SpanSchedule.parts`)
std::vector<Span> read_spans(const at::Tensor& spans) {
  TORCH_CHECK(spans.dim() == 2 && (spans.size(1) == 5 || spans.size(1) == 6) && spans.scalar_type() == at::kLong &&
                  spans.is_cpu(),
              "spans must be a [n, 5] or [n, 6] int64 CPU tensor");
  const auto a = spans.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  const int64_t c = a.size(1);
  std::vector<Span> out(a.size(0));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t* r = p + c * i;
    out[i] = {r[0], r[1], r[2], r[3], r[4], c == 6 ? r[5] : -1};
    TORCH_CHECK(out[i].part >= -1, "a span's part must be -1 or a slot index");
  }
  return out;
}

void check_groups(const std::vector<int64_t>& group_ptr, size_t num_spans) {
  TORCH_CHECK(!group_ptr.empty() && group_ptr.front() == 0 && static_cast<size_t>(group_ptr.back()) == num_spans &&
                  std::is_sorted(group_ptr.begin(), group_ptr.end()),
              "group_ptr must rise from 0 to the number of spans");
}

// MKL (float32 GEMMs) keeps a pool of packing buffers per calling thread: with the span loop's
// single-threaded GEMMs on every thread the float32 8-experts x 4096-tokens row of
// benchmarks/moe_layer.py had a median peak of 116 MiB (1.16x of the floor's); with each
// thread handing its pool back when its groups are done, 108 MiB (1.02x). A weak symbol: torch without MKL has none.
extern "C" void mkl_serv_thread_free_buffers(void) __attribute__((weak));

void release_gemm_buffers() {
  if (mkl_serv_thread_free_buffers != nullptr) mkl_serv_thread_free_buffers();
}

// body(first, last) for the spans of every group, one group per thread. With one group the
// body runs on the calling thread and its ATen ops keep all cores. The caller's thread-local
// state (grad mode, dispatch keys) goes with every thread; the first exception is rethrown.
// Group g always runs on thread g % threads (a static schedule): PyTorch's ideep layer keeps
// its cache of compiled GEMM kernels per thread (benchmarks/gemm_shape_memory.py), so a thread
// that keeps its groups compiles and keeps only their row counts.
template <typename Body>
void for_each_group(const std::vector<int64_t>& group_ptr, const Body& body) {
  const int64_t groups = static_cast<int64_t>(group_ptr.size()) - 1;
  if (groups <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t g = 0; g < groups; ++g) body(group_ptr[g], group_ptr[g + 1]);
    return;
  }
  const at::ThreadLocalState state;
  std::exception_ptr error;
  const int threads = static_cast<int>(std::min<int64_t>(groups, at::get_num_threads()));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    for (int64_t g = t; g < groups; g += threads) {
      try {
        at::ThreadLocalStateGuard guard(state);
        body(group_ptr[g], group_ptr[g + 1]);
      } catch (...) {
#pragma omp critical(moe_scale_mlp_error)
        if (!error) error = std::current_exception();
      }
    }
    release_gemm_buffers();
  }
  if (error) std::rethrow_exception(error);
}

at::Tensor rows(const at::Tensor& t, int64_t lo, int64_t hi) { return t.slice(0, lo, hi); }

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bits_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// The products of the span loop, by ATen (oneDNN / MKL) or, for bfloat16 with `native`, by
// the ahead-of-time compiled kernel of bf16_gemm.cpp (no per-shape JIT kernels, ReLU and its
// backward fused into the GEMM). One instance per thread: it owns the packing buffers.
// Every operand has unit column stride; `dst` may be a row range of a larger tensor.
class Products {
 public:
  explicit Products(bool native) : native_(native) {}

  // dst = a @ w (+ bias), then ReLU if `relu`; w [k, n]
  void mm(at::Tensor dst, const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool relu) {
    if (native_) {
      pack(w, pairs_w_);
      bf16::Epilogue ep;
      ep.bias = bias ? bits(*bias) : nullptr;
      ep.relu = relu;
      native(a, pairs_w_, w.size(1), dst, ep);
      return;
    }
    bias ? at::addmm_out(dst, *bias, a, w) : at::mm_out(dst, a, w);
    if (relu) ::relu_(dst);
  }

  // dst (+)= g @ w^T, w [n, k]; with `keep`, ReLU's backward: zero where keep <= 0
  void mm_t(at::Tensor dst, const at::Tensor& g, const at::Tensor& w, const at::Tensor* keep, bool accumulate) {
    if (native_) {
      pairs_w_.resize(w.size(1) / 2 * w.size(0));
      bf16::pack_transposed(bits(w), w.stride(0), w.size(0), w.size(1), pairs_w_.data());
      bf16::Epilogue ep;
      ep.keep = keep ? bits(*keep) : nullptr;
      ep.ld_keep = keep ? keep->stride(0) : 0;
      ep.accumulate = accumulate;
      native(g, pairs_w_, w.size(0), dst, ep);
      return;
    }
    accumulate ? dst.addmm_(g, w.t()) : at::mm_out(dst, g, w.t());
    if (keep) ::relu_backward_(dst, *keep);
  }

  // dst = u^T @ v, summed over rows; dst may be float32 (a split expert's partial gradient)
  void wgrad(at::Tensor dst, const at::Tensor& u, const at::Tensor& v) {
    if (!native_ || dst.scalar_type() != u.scalar_type()) {
      if (dst.scalar_type() == u.scalar_type())
        at::mm_out(dst, u.t(), v);
      else if (native_)
        wgrad_f32(dst, u, v);
      else
        dst.copy_(at::mm(u.t().to(dst.scalar_type()), v.to(dst.scalar_type())));
      return;
    }
    acc_.resize(u.size(1) * v.size(1));
    wgrad_pieces(u, v, acc_.data(), v.size(1), &dst);
  }

 private:
  // u^T @ v over pieces of kWgradRows rows, summed in float32 in `acc` (row stride ld_acc): the
  // packed pieces stay in L2 and take 1/4 of the memory a whole 1024-row expert block would.
  // With `out` (bf16) the last piece adds the float32 sum of the others in its epilogue and
  // writes `out` instead, rounded once. At least one piece runs: no rows give zeros.
  void wgrad_pieces(const at::Tensor& u, const at::Tensor& v, float* acc, int64_t ld_acc, at::Tensor* out) {
    const int64_t rows = u.size(0), m = u.size(1), n = v.size(1);
    int64_t r0 = 0;
    do {
      const int64_t r1 = std::min(rows, r0 + kWgradRows), kp = (r1 - r0 + 1) / 2;
      pack(u.slice(0, r0, r1), pairs_u_);
      pack(v.slice(0, r0, r1), pairs_v_);
      bf16::Epilogue ep;
      if (out != nullptr && r1 == rows) {
        ep.addend = r0 > 0 ? acc : nullptr;
        ep.ld_addend = ld_acc;
        bf16::gemm(pairs_u_.data(), 1, m, pairs_v_.data(), n, m, n, kp, bits_mut(*out), out->stride(0), ep);
      } else {
        ep.accumulate = r0 > 0;
        bf16::gemm(pairs_u_.data(), 1, m, pairs_v_.data(), n, m, n, kp, acc, ld_acc, ep);
      }
      r0 = r1;
    } while (r0 < rows);
  }

  // dst (float32, contiguous rows) = u^T @ v
  void wgrad_f32(at::Tensor& dst, const at::Tensor& u, const at::Tensor& v) {
    wgrad_pieces(u, v, dst.data_ptr<float>(), dst.stride(0), nullptr);
  }

  static void pack(const at::Tensor& x, std::vector<uint32_t>& out) {
    out.resize((x.size(0) + 1) / 2 * x.size(1));
    bf16::pack_row_pairs(bits(x), x.stride(0), x.size(0), x.size(1), out.data());
  }

  // dst = a @ B for B given as pairs [k / 2, n]
  static void native(const at::Tensor& a, const std::vector<uint32_t>& b, int64_t n, at::Tensor& dst,
                     const bf16::Epilogue& ep) {
    const auto* a_pairs = reinterpret_cast<const uint32_t*>(a.data_ptr());
    bf16::gemm(a_pairs, a.stride(0) / 2, 1, b.data(), n, a.size(0), n, a.size(1) / 2, bits_mut(dst), dst.stride(0), ep);
  }

  static constexpr int64_t kWgradRows = 256;  // even: pieces pair rows as the whole would

  bool native_;
  std::vector<uint32_t> pairs_w_, pairs_u_, pairs_v_;
  std::vector<float> acc_;
};

// `a @ w (+ bias)` (then ReLU) over the span's rows, written into out[lo:hi], or for a span
// reaching forward (hi > end) into a new block whose own rows go to out[s:end] (see `_span_mm`).
at::Tensor span_mm(Products& products, const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   at::Tensor& out, const Span& sp) {
  at::Tensor dst = sp.hi > sp.end ? at::empty({a.size(0), w.size(1)}, a.options()) : rows(out, sp.lo, sp.hi);
  products.mm(dst, a, w, bias, false);
  return dst;
}

void copy_own_rows(at::Tensor& out, const at::Tensor& block, const Span& sp) {
  if (sp.hi > sp.end) rows(out, sp.s, sp.end).copy_(block.slice(0, 0, sp.end - sp.s));
}

std::optional<at::Tensor> at_expert(const std::optional<at::Tensor>& t, int64_t e) {
  return t ? std::optional<at::Tensor>((*t)[e]) : std::nullopt;
}

// dst (contiguous, float32 or bf16) = the sum of the float32 partials[i] for i in `which`, in
// that order, rounded once: one pass, both threads.
void sum_parts(at::Tensor dst, const at::Tensor& partials, const std::vector<int64_t>& which) {
  const int64_t n = dst.numel();
  std::vector<const float*> src;
  for (int64_t i : which) src.push_back(partials.data_ptr<float>() + i * n);
  const bool bf16 = dst.scalar_type() == at::kBFloat16;
  float* out_f = bf16 ? nullptr : dst.data_ptr<float>();
  uint16_t* out_h = bf16 ? bits_mut(dst) : nullptr;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += 1024) {
      const int64_t i1 = std::min(end, i0 + 1024);
      float buf[1024];
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) buf[i - i0] = src[0][i];
      for (size_t k = 1; k < src.size(); ++k) {
        const float* p = src[k];
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) buf[i - i0] += p[i];
      }
      if (bf16) {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) out_h[i] = float_to_bf16(buf[i - i0]);
      } else {
        std::memcpy(out_f + i0, buf, (i1 - i0) * sizeof(float));
      }
    }
  });
}

}  // namespace

bool native_bf16_gemm(const at::Tensor& x, const at::Tensor& w1);

// y = act(x w1 [+ b1]) w2 [+ b2] over every span -> [y, then (a, t, h3) per span]: a the
// activation, t what its backward reads when that is not `a` (else undefined), h3 the SwiGLU
// gate (else undefined). Undefined tensors reach Python as None. `native`: bfloat16 GEMMs by
// bf16_gemm.cpp (see `native_bf16_gemm`, Python's `can_run_native_bf16_gemm`).
std::vector<at::Tensor> mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                    const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b1,
                                    const std::optional<at::Tensor>& b2, const at::Tensor& spans_t,
                                    const std::vector<int64_t>& group_ptr, int64_t activation, bool native) {
  TORCH_CHECK(activation >= kReLU && activation <= kSwiGLU, "unknown activation code ", activation);
  TORCH_CHECK((activation == kSwiGLU) == w3.has_value(), "w3 is given exactly for SwiGLU");
  TORCH_CHECK(!native || native_bf16_gemm(x, w1), "the native GEMM needs bfloat16 with even d and h");
  const auto spans = read_spans(spans_t);
  check_groups(group_ptr, spans.size());
  at::Tensor y = at::empty({x.size(0), w2.size(-1)}, x.options());
  std::vector<at::Tensor> out(1 + 3 * spans.size());
  const int64_t hidden = w1.size(2);
  for_each_group(group_ptr, [&](int64_t first, int64_t last) {
    Products products(native);
    for (int64_t i = first; i < last; ++i) {
      const Span& sp = spans[i];
      const at::Tensor x_e = rows(x, sp.lo, sp.hi);
      at::Tensor h = at::empty({x_e.size(0), hidden}, x.options());
      products.mm(h, x_e, w1[sp.e], at_expert(b1, sp.e), activation == kReLU);
      at::Tensor h3;
      if (w3) {
        h3 = at::empty_like(h);
        products.mm(h3, x_e, (*w3)[sp.e], std::nullopt, false);
      }
      at::Tensor a, t;
      if (activation == kReLU) {
        a = h;
      } else {
        a = activation == kGELU ? at::gelu(h) : at::silu(h).mul_(h3);
        t = h;
      }
      copy_own_rows(y, span_mm(products, a, w2[sp.e], at_expert(b2, sp.e), y, sp), sp);
      out[1 + 3 * i] = a;
      out[2 + 3 * i] = t;
      out[3 + 3 * i] = h3;
    }
  });
  out[0] = y;
  return out;
}

// Gradients of `mlp_forward` -> [g_x (undefined unless need_x), g_w1, g_w2, g_w3, g_b1, g_b2]
// (undefined where there is no such parameter). `saved` is the forward's list after y.
std::vector<at::Tensor> mlp_backward(const at::Tensor& g_y, const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& w2, const std::optional<at::Tensor>& w3,
                                     const std::vector<std::optional<at::Tensor>>& saved, bool has_b1, bool has_b2,
                                     bool need_x, const at::Tensor& spans_t, const std::vector<int64_t>& group_ptr,
                                     int64_t activation, bool native) {
  TORCH_CHECK(g_y.is_contiguous(), "g_y must be contiguous");
  TORCH_CHECK(!native || native_bf16_gemm(x, w1), "the native GEMM needs bfloat16 with even d and h");
  const auto spans = read_spans(spans_t);
  check_groups(group_ptr, spans.size());
  TORCH_CHECK(saved.size() == 3 * spans.size(), "saved must hold three entries per span");
  const int64_t E = w1.size(0), d = w1.size(1), h = w1.size(2);
  const auto opts = x.options();
  at::Tensor g_w1 = at::empty({E, d, h}, opts), g_w2 = at::empty({E, h, d}, opts);
  at::Tensor g_w3 = w3 ? at::empty({E, d, h}, opts) : at::Tensor();
  at::Tensor g_b1 = has_b1 ? at::empty({E, h}, opts) : at::Tensor();
  at::Tensor g_b2 = has_b2 ? at::empty({E, d}, opts) : at::Tensor();
  std::vector<char> has_rows(E, 0);
  for (const Span& sp : spans) has_rows[sp.e] = 1;
  for (int64_t e = 0; e < E; ++e) {
    if (has_rows[e]) continue;  // an expert without rows gets zero gradients
    for (at::Tensor* g : {&g_w1, &g_w2, &g_w3, &g_b1, &g_b2})
      if (g->defined()) (*g)[e].zero_();
  }
  at::Tensor g_x = need_x ? at::empty_like(x) : at::Tensor();
  // zeroed and restored in place, span by span (see `foreign_rows_zeroed`)
  at::Tensor g_y_rw = g_y;
  // The pieces of a split expert (on different threads) write float32 partial gradients,
  // summed into the expert's gradients (one rounding) once every group is done.
  int64_t parts = 0;
  for (const Span& sp : spans) parts = std::max(parts, sp.part + 1);
  const auto f32 = opts.dtype(at::kFloat);
  auto partial = [&](const at::Tensor& g, std::vector<int64_t> shape) {
    shape.insert(shape.begin(), parts);
    return parts && g.defined() ? at::empty(shape, f32) : at::Tensor();
  };
  at::Tensor p_w1 = partial(g_w1, {d, h}), p_w2 = partial(g_w2, {h, d}), p_w3 = partial(g_w3, {d, h});
  at::Tensor p_b1 = partial(g_b1, {h}), p_b2 = partial(g_b2, {d});
  // where span `sp` writes the gradient `g` of its expert (`p`: the partials of g)
  auto grad_of = [](const at::Tensor& g, const at::Tensor& p, const Span& sp) { return sp.part >= 0 ? p[sp.part] : g[sp.e]; };

  for_each_group(group_ptr, [&](int64_t first, int64_t last) {
    Products products(native);
    int64_t longest = 0;
    for (int64_t i = first; i < last; ++i) longest = std::max(longest, spans[i].hi - spans[i].lo);
    at::Tensor scratch_h = at::empty({longest, h}, opts);
    for (int64_t i = first; i < last; ++i) {
      const Span& sp = spans[i];
      const int64_t e = sp.e;
      const at::Tensor a = *saved[3 * i];
      const at::Tensor t = saved[3 * i + 1] ? *saved[3 * i + 1] : a;
      const std::optional<at::Tensor>& h3 = saved[3 * i + 2];
      // The other experts' rows of the output gradient are zero for this span's products:
      // they add nothing to a weight gradient and give zero hidden gradients.
      at::Tensor head, tail;
      const bool foreign = sp.lo != sp.s || sp.hi != sp.end;
      if (foreign) {
        head = rows(g_y_rw, sp.lo, sp.s).clone();
        tail = rows(g_y_rw, sp.end, sp.hi).clone();
        rows(g_y_rw, sp.lo, sp.s).zero_();
        rows(g_y_rw, sp.end, sp.hi).zero_();
      }
      const at::Tensor gy = rows(g_y_rw, sp.lo, sp.hi);
      at::Tensor g_a = scratch_h.slice(0, 0, sp.hi - sp.lo);
      // ReLU's backward (g_a = 0 where a <= 0) comes with the GEMM
      products.mm_t(g_a, gy, w2[e], activation == kReLU ? &t : nullptr, false);
      products.wgrad(grad_of(g_w2, p_w2, sp), a, gy);
      if (has_b2) {
        at::Tensor dst = grad_of(g_b2, p_b2, sp);
        at::sum_out(dst, gy, {0}, false, dst.scalar_type());
      }
      if (foreign) {
        rows(g_y_rw, sp.lo, sp.s).copy_(head);
        rows(g_y_rw, sp.end, sp.hi).copy_(tail);
      }
      at::Tensor g_h3;
      if (activation == kGELU) {
        at::gelu_backward_out(g_a, g_a, t);
      } else if (activation == kSwiGLU) {
        g_h3 = g_a * at::silu(t);
        g_a.mul_(*h3);
        at::silu_backward_out(g_a, g_a, t);
      }
      const at::Tensor x_e = rows(x, sp.lo, sp.hi);
      products.wgrad(grad_of(g_w1, p_w1, sp), x_e, g_a);
      if (has_b1) {
        at::Tensor dst = grad_of(g_b1, p_b1, sp);
        at::sum_out(dst, g_a, {0}, false, dst.scalar_type());
      }
      if (g_h3.defined()) products.wgrad(grad_of(g_w3, p_w3, sp), x_e, g_h3);
      if (need_x) {
        at::Tensor g_x_rows = sp.hi > sp.end ? at::empty({sp.hi - sp.lo, d}, opts) : rows(g_x, sp.lo, sp.hi);
        products.mm_t(g_x_rows, g_a, w1[e], nullptr, false);
        if (g_h3.defined()) products.mm_t(g_x_rows, g_h3, (*w3)[e], nullptr, true);
        copy_own_rows(g_x, g_x_rows, sp);
      }
    }
  });
  if (parts) {
    std::vector<std::vector<int64_t>> parts_of(E);
    for (const Span& sp : spans)
      if (sp.part >= 0) parts_of[sp.e].push_back(sp.part);
    for (int64_t e = 0; e < E; ++e) {
      if (parts_of[e].empty()) continue;
      for (auto [g, p] : {std::pair{&g_w1, &p_w1}, {&g_w2, &p_w2}, {&g_w3, &p_w3}, {&g_b1, &p_b1}, {&g_b2, &p_b2}})
        if (g->defined()) sum_parts((*g)[e], *p, parts_of[e]);
    }
  }
  return {g_x, g_w1, g_w2, g_w3, g_b1, g_b2};
}

// Whether the native bf16 GEMM can run this MLP: bfloat16, even d and h, the kernel compiled
// for this CPU (AVX512-BF16).
bool native_bf16_gemm(const at::Tensor& x, const at::Tensor& w1) {
  return bf16::available() && x.scalar_type() == at::kBFloat16 && w1.scalar_type() == at::kBFloat16 &&
         w1.dim() == 3 && w1.size(1) % 2 == 0 && w1.size(2) % 2 == 0;
}

// The native products one at a time, for tests and benchmarks/bf16_gemm.py. Operands are
// bfloat16 with unit column stride; `out` is written in place.
namespace {
void check_native(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(bf16::available(), "the native bf16 GEMM is not compiled for this CPU (needs AVX512-BF16)");
  for (const auto* t : {&a, &b})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->stride(1) == 1 && t->stride(0) % 2 == 0,
                "operands must be 2-D bfloat16 with unit column stride and an even row stride");
}
}  // namespace

void bf16_mm(at::Tensor out, const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias,
             bool relu) {
  check_native(a, w);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == w.size(1)),
              "bf16_mm: bias must be a contiguous bfloat16 [n]");
  TORCH_CHECK(a.size(1) % 2 == 0 && a.size(1) == w.size(0) && out.sizes() == at::IntArrayRef({a.size(0), w.size(1)}),
              "bf16_mm: out [m, n] = a [m, k] @ w [k, n] with even k");
  Products(true).mm(out, a, w, bias, relu);
}

void bf16_mm_t(at::Tensor out, const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& keep,
               bool accumulate) {
  check_native(g, w);
  TORCH_CHECK(g.size(1) % 2 == 0 && g.size(1) == w.size(1) && out.sizes() == at::IntArrayRef({g.size(0), w.size(0)}),
              "bf16_mm_t: out [m, n] = g [m, k] @ w [n, k]^T with even k");
  Products(true).mm_t(out, g, w, keep ? &*keep : nullptr, accumulate);
}

void bf16_wgrad(at::Tensor out, const at::Tensor& u, const at::Tensor& v) {
  check_native(u, v);
  TORCH_CHECK(u.size(0) == v.size(0) && out.sizes() == at::IntArrayRef({u.size(1), v.size(1)}),
              "bf16_wgrad: out [m, n] = u [r, m]^T @ v [r, n]");
  Products(true).wgrad(out, u, v);
}
