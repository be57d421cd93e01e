// Expert-parallel forward and backward of the fused grouped MLP (see `_MLP` in
// moe_scale/moe/grouped_mlp.py, which runs the same spans one after another from Python).
//
// The spans come in groups of neighbouring experts whose rows no other group touches (see
// `_Blocks`). Each group runs on one thread, its GEMMs single-threaded, so a thread keeps its
// expert's blocks in its own cache and no GEMM splits its rows across cores: with 8 experts
// of ~1000 rows in bfloat16 the per-expert GEMMs take 0.77x the time of the same GEMMs each
// run on both cores, and beat one padded `bmm` (benchmarks/moe_layer.py). Inside a group the
// spans run in the order given, which is what makes bucketed spans exact (a span's rows that
// belong to a lower expert are rewritten by that expert later, in the same thread).
//
// Every product is the one the Python loop makes, on the same rows, so the two paths compute
// the same function.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>

#include <algorithm>
#include <exception>
#include <optional>
#include <vector>

void relu_(at::Tensor x);
void relu_backward_(at::Tensor grad, at::Tensor out);

namespace {

enum Activation : int64_t { kReLU = 0, kGELU = 1, kSwiGLU = 2 };

struct Span {
  int64_t e, lo, hi, s, end;  // expert e owns rows [s, end) and computes over [lo, hi)
};

std::vector<Span> read_spans(const at::Tensor& spans) {
  TORCH_CHECK(spans.dim() == 2 && spans.size(1) == 5 && spans.scalar_type() == at::kLong && spans.is_cpu(),
              "spans must be a [n, 5] int64 CPU tensor");
  const auto a = spans.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  std::vector<Span> out(a.size(0));
  for (size_t i = 0; i < out.size(); ++i) out[i] = {p[5 * i], p[5 * i + 1], p[5 * i + 2], p[5 * i + 3], p[5 * i + 4]};
  return out;
}

void check_groups(const std::vector<int64_t>& group_ptr, size_t num_spans) {
  TORCH_CHECK(!group_ptr.empty() && group_ptr.front() == 0 && static_cast<size_t>(group_ptr.back()) == num_spans &&
                  std::is_sorted(group_ptr.begin(), group_ptr.end()),
              "group_ptr must rise from 0 to the number of spans");
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
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int64_t g = 0; g < groups; ++g) {
    try {
      at::ThreadLocalStateGuard guard(state);
      body(group_ptr[g], group_ptr[g + 1]);
    } catch (...) {
#pragma omp critical(moe_scale_mlp_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

at::Tensor rows(const at::Tensor& t, int64_t lo, int64_t hi) { return t.slice(0, lo, hi); }

void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// `a @ w (+ bias)` over the span's rows, written into out[lo:hi], or for a span reaching
// forward (hi > end) into a new block whose own rows go to out[s:end] (see `_span_mm`).
at::Tensor span_mm(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out,
                   const Span& sp) {
  if (sp.hi > sp.end) return bias ? at::addmm(*bias, a, w) : at::mm(a, w);
  at::Tensor dst = rows(out, sp.lo, sp.hi);
  return bias ? at::addmm_out(dst, *bias, a, w) : at::mm_out(dst, a, w);
}

void copy_own_rows(at::Tensor& out, const at::Tensor& block, const Span& sp) {
  if (sp.hi > sp.end) rows(out, sp.s, sp.end).copy_(block.slice(0, 0, sp.end - sp.s));
}

std::optional<at::Tensor> at_expert(const std::optional<at::Tensor>& t, int64_t e) {
  return t ? std::optional<at::Tensor>((*t)[e]) : std::nullopt;
}

}  // namespace

// y = act(x w1 [+ b1]) w2 [+ b2] over every span -> [y, then (a, t, h3) per span]: a the
// activation, t what its backward reads when that is not `a` (else undefined), h3 the SwiGLU
// gate (else undefined). Undefined tensors reach Python as None.
std::vector<at::Tensor> mlp_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                    const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b1,
                                    const std::optional<at::Tensor>& b2, const at::Tensor& spans_t,
                                    const std::vector<int64_t>& group_ptr, int64_t activation) {
  TORCH_CHECK(activation >= kReLU && activation <= kSwiGLU, "unknown activation code ", activation);
  TORCH_CHECK((activation == kSwiGLU) == w3.has_value(), "w3 is given exactly for SwiGLU");
  const auto spans = read_spans(spans_t);
  check_groups(group_ptr, spans.size());
  at::Tensor y = at::empty({x.size(0), w2.size(-1)}, x.options());
  std::vector<at::Tensor> out(1 + 3 * spans.size());
  for_each_group(group_ptr, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Span& sp = spans[i];
      const at::Tensor x_e = rows(x, sp.lo, sp.hi);
      at::Tensor h = b1 ? at::addmm((*b1)[sp.e], x_e, w1[sp.e]) : at::mm(x_e, w1[sp.e]);
      at::Tensor h3 = w3 ? at::mm(x_e, (*w3)[sp.e]) : at::Tensor();
      at::Tensor a, t;
      if (activation == kReLU) {
        ::relu_(h);
        a = h;
      } else {
        a = activation == kGELU ? at::gelu(h) : at::silu(h).mul_(h3);
        t = h;
      }
      copy_own_rows(y, span_mm(a, w2[sp.e], at_expert(b2, sp.e), y, sp), sp);
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
                                     int64_t activation) {
  TORCH_CHECK(g_y.is_contiguous(), "g_y must be contiguous");
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
  at::Tensor g_y_rw = g_y;  // zeroed and restored in place, span by span (see `_Ops.own_rows`)

  for_each_group(group_ptr, [&](int64_t first, int64_t last) {
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
      at::mm_out(g_a, gy, w2[e].t());
      mm_into(g_w2[e], a.t(), gy);
      if (has_b2) {
        at::Tensor dst = g_b2[e];
        at::sum_out(dst, gy, 0);
      }
      if (foreign) {
        rows(g_y_rw, sp.lo, sp.s).copy_(head);
        rows(g_y_rw, sp.end, sp.hi).copy_(tail);
      }
      at::Tensor g_h3;
      if (activation == kReLU) {
        ::relu_backward_(g_a, t);
      } else if (activation == kGELU) {
        at::gelu_backward_out(g_a, g_a, t);
      } else {
        g_h3 = g_a * at::silu(t);
        g_a.mul_(*h3);
        at::silu_backward_out(g_a, g_a, t);
      }
      const at::Tensor x_e = rows(x, sp.lo, sp.hi);
      mm_into(g_w1[e], x_e.t(), g_a);
      if (has_b1) {
        at::Tensor dst = g_b1[e];
        at::sum_out(dst, g_a, 0);
      }
      if (g_h3.defined()) mm_into(g_w3[e], x_e.t(), g_h3);
      if (need_x) {
        at::Tensor g_x_rows = span_mm(g_a, w1[e].t(), std::nullopt, g_x, sp);
        if (g_h3.defined()) g_x_rows.addmm_(g_h3, (*w3)[e].t());
        copy_own_rows(g_x, g_x_rows, sp);
      }
    }
  });
  return {g_x, g_w1, g_w2, g_w3, g_b1, g_b2};
}
