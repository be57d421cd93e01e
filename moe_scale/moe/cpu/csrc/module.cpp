// The Python module of the fused CPU kernels (see moe_scale/moe/cpu/kernels.py).

#include <optional>
#include <vector>

#include <torch/extension.h>

void relu_(torch::Tensor x);
void relu_backward_(torch::Tensor grad, torch::Tensor out);
std::vector<torch::Tensor> mlp_forward(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2,
                                       const std::optional<torch::Tensor>& w3, const std::optional<torch::Tensor>& b1,
                                       const std::optional<torch::Tensor>& b2, const torch::Tensor& spans,
                                       const std::vector<int64_t>& group_ptr, int64_t activation, bool native);
std::vector<torch::Tensor> mlp_backward(const torch::Tensor& g_y, const torch::Tensor& x, const torch::Tensor& w1,
                                        const torch::Tensor& w2, const std::optional<torch::Tensor>& w3,
                                        const std::vector<std::optional<torch::Tensor>>& saved, bool has_b1,
                                        bool has_b2, bool need_x, const torch::Tensor& spans,
                                        const std::vector<int64_t>& group_ptr, int64_t activation, bool native);
bool native_bf16_gemm(const torch::Tensor& x, const torch::Tensor& w1);
void bf16_mm(torch::Tensor out, const torch::Tensor& a, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
             bool relu);
void bf16_mm_t(torch::Tensor out, const torch::Tensor& g, const torch::Tensor& w, const std::optional<torch::Tensor>& keep,
               bool accumulate);
void bf16_wgrad(torch::Tensor out, const torch::Tensor& u, const torch::Tensor& v);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("relu_", &relu_, "in-place ReLU");
  m.def("relu_backward_", &relu_backward_, "in-place ReLU backward");
  // The span loop runs ATen ops on several threads; a Python dispatch mode (propagated to them
  // with the caller's thread-local state) needs the GIL there, so the call lets go of it.
  m.def("mlp_forward", &mlp_forward, "grouped expert MLP forward, one group of experts per thread",
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp_backward", &mlp_backward, "grouped expert MLP backward, one group of experts per thread",
        py::call_guard<py::gil_scoped_release>());
  m.def("can_run_native_bf16_gemm", &native_bf16_gemm, "whether the native bf16 GEMM (AVX512-BF16) can run this MLP");
  m.def("bf16_mm", &bf16_mm, "native bf16 GEMM: out = a @ w (+ bias), ReLU optional");
  m.def("bf16_mm_t", &bf16_mm_t, "native bf16 GEMM: out (+)= g @ w^T, zero where keep <= 0");
  m.def("bf16_wgrad", &bf16_wgrad, "native bf16 GEMM: out = u^T @ v");
}
