// bfloat16 GEMM for the expert MLP on CPUs with AVX512-BF16 (used by mlp_kernels.cpp).
//
// Operands are bf16 bit patterns. The reduction runs over pairs of bf16 values held in one
// 32-bit word ("pairs"): A's pairs are consecutive along K in a row-major A; B must be packed
// so that B[2kp][n] and B[2kp + 1][n] share a word.
#pragma once
#include <cstdint>

namespace moe_scale::bf16 {

bool available();

// out[kp][c] (32-bit pair) = (x[2kp][c], x[2kp+1][c]) for x [rows, cols] with row stride ld;
// a missing last row is zero. out holds ceil(rows / 2) * cols pairs.
void pack_row_pairs(const uint16_t* x, int64_t ld, int64_t rows, int64_t cols, uint32_t* out);

// The pairs of w^T for w [n, k] (k even) with row stride ld: out[kp][j] = (w[j][2kp], w[j][2kp+1]).
void pack_transposed(const uint16_t* w, int64_t ld, int64_t n, int64_t k, uint32_t* out);

struct Epilogue {
  const uint16_t* bias = nullptr;      // [N], added before rounding
  bool relu = false;                   // max(c, 0)
  const uint16_t* keep = nullptr;      // [M, N] with row stride ld_keep: c = 0 where keep <= 0 (ReLU backward)
  int64_t ld_keep = 0;
  bool accumulate = false;             // c += the product (reads C's old values)
  const float* addend = nullptr;       // [M, N] float32 with row stride ld_addend, added before rounding
  int64_t ld_addend = 0;
};

// C[M, N] (bf16, row stride ldc) = A B: A[m][kp] pairs at a[m * a_rs + kp * a_ks], B pairs [Kp][N] with
// row stride ldb; float32 accumulation, one rounding. Parallel over tiles unless inside a parallel region.
void gemm(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b, int64_t ldb, int64_t M, int64_t N,
          int64_t Kp, uint16_t* c, int64_t ldc, const Epilogue& ep);
// The same with a float32 C (accumulate adds to its float32 values).
void gemm(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b, int64_t ldb, int64_t M, int64_t N,
          int64_t Kp, float* c, int64_t ldc, const Epilogue& ep);

}  // namespace moe_scale::bf16
