// The bfloat16 GEMMs of the expert MLP on CPUs with AVX512-BF16 (see bf16_gemm.h).
//
// oneDNN, which runs PyTorch's bf16 GEMMs on CPU, JIT-compiles kernels for every GEMM shape
// and keeps them, ~0.7 MiB of resident memory per shape and per thread
// (benchmarks/gemm_shape_memory.py); an MoE layer, whose expert row counts change with the
// routing, meets many shapes. This kernel is compiled ahead of time for any shape. A 6 x 64
// micro tile holds 24 float32 accumulators; each step of the reduction broadcasts a pair of
// A's bf16 values and multiplies it into four vectors of 16 pairs of B with VDPBF16PS, so B
// must come as row pairs (`pack_row_pairs`, `pack_transposed`). benchmarks/bf16_gemm.py
// compares it with ATen's oneDNN GEMM on the MLP's shapes.

#include "bf16_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOE_SCALE_BF16_GEMM 1
#endif

namespace moe_scale::bf16 {

#ifdef MOE_SCALE_BF16_GEMM

bool available() { return true; }

namespace {

constexpr int kNR = 64;  // columns per micro tile: four 16-float vectors
constexpr int kMR = 6;   // rows per micro tile: 24 accumulators

// C: uint16_t (bf16 output, rounded once) or float (float32 output).
template <int MR, typename C>
inline void micro_tile(const uint32_t* __restrict a, int64_t a_rs, int64_t a_ks, const uint32_t* __restrict b,
                       int64_t ldb, int64_t Kp, C* __restrict c, int64_t ldc, int ncols, const Epilogue& ep,
                       int64_t col0, const uint16_t* keep, const float* addend) {
  // What the epilogue touches (the output, the ReLU mask) comes in while the reduction runs:
  // otherwise the dgrad GEMM stalls on the mask's cold rows after it.
  for (int r = 0; r < 2 * MR; ++r)  // this tile's rows and the next tile's (prefetches never fault)
    for (int off = 0; off < ncols; off += 32) {
      if (keep) _mm_prefetch(reinterpret_cast<const char*>(keep + r * ep.ld_keep + off), _MM_HINT_T0);
      if (addend) {
        _mm_prefetch(reinterpret_cast<const char*>(addend + r * ep.ld_addend + off), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(addend + r * ep.ld_addend + off + 16), _MM_HINT_T0);
      }
      __builtin_prefetch(c + r * ldc + off, 1, 3);  // for writing: the output's lines are read in first
    }
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  if (ncols == kNR) {
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const uint32_t* bp = b + kp * ldb;
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 16);
      const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + 32);
      const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bp + 48);
      const uint32_t* ap = a + kp * a_ks;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * a_rs]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
      }
    }
  } else {
    __mmask16 m[4];
    for (int j = 0; j < 4; ++j) {
      const int rem = std::clamp(ncols - 16 * j, 0, 16);
      m[j] = static_cast<__mmask16>((1u << rem) - 1u);
    }
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const uint32_t* bp = b + kp * ldb;
      __m512bh bv[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) bv[j] = (__m512bh)_mm512_maskz_loadu_epi32(m[j], bp + 16 * j);
      const uint32_t* ap = a + kp * a_ks;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * a_rs]));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
      }
    }
  }
  __m512 bias[4];
  if (ep.bias) {
    for (int j = 0; j < 4; ++j) {
      const int rem = std::clamp(ncols - 16 * j, 0, 16);
      const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << rem) - 1u), ep.bias + col0 + 16 * j);
      bias[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int rem = ncols - 16 * j;
      if (rem <= 0) break;
      const __mmask16 mask = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
      __m512 v = acc[r][j];
      if (ep.bias) v = _mm512_add_ps(v, bias[j]);
      if (addend) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, addend + r * ep.ld_addend + 16 * j));
      if (ep.accumulate) {
        if constexpr (std::is_same_v<C, float>) {
          v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * j));
        } else {
          const __m256i old = _mm256_maskz_loadu_epi16(mask, c + r * ldc + 16 * j);
          v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
        }
      }
      if (ep.relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // NaN stays NaN (maxps returns its 2nd operand)
      if (keep) {
        // as threshold_backward(g, a, 0): g where a > 0 or a is NaN, else 0 (bf16 bit patterns)
        const __m256i k16 = _mm256_maskz_loadu_epi16(mask, keep + r * ep.ld_keep + 16 * j);
        const __mmask16 kept =
            _mm256_cmpgt_epi16_mask(k16, _mm256_setzero_si256()) |
            _mm256_cmpgt_epi16_mask(_mm256_and_si256(k16, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x7F80));
        v = _mm512_maskz_mov_ps(kept, v);
      }
      if constexpr (std::is_same_v<C, float>) {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * j, mask, v);
      } else {
        const __m256i out = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(c + r * ldc + 16 * j, mask, out);
      }
    }
}

template <typename C>
using TileFn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, C*, int64_t, int,
                        const Epilogue&, int64_t, const uint16_t*, const float*);
template <typename C>
constexpr TileFn<C> kTiles[kMR + 1] = {nullptr,           &micro_tile<1, C>, &micro_tile<2, C>, &micro_tile<3, C>,
                                       &micro_tile<4, C>, &micro_tile<5, C>, &micro_tile<6, C>};

template <typename C>
void gemm_into(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b, int64_t ldb, int64_t M, int64_t N,
               int64_t Kp, C* c, int64_t ldc, const Epilogue& ep) {
  if (M <= 0 || N <= 0) return;
  // Tiles of kMR * 8 rows by kNR columns; within a tile column panel the B panel stays in cache.
  constexpr int64_t kRowBlock = kMR * 8;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock, col_blocks = (N + kNR - 1) / kNR;
  // Stream the larger operand once and keep the smaller one's blocks in cache: with A the
  // larger, a row block of A meets every column panel of B before the next; otherwise a
  // panel of B meets every row block (the weight gradients, whose B has the most rows).
  const bool rows_outer = M >= N;  // A is M x Kp pairs, B is Kp x N
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nb = rows_outer ? t % col_blocks : t / row_blocks;
      const int64_t rb = rows_outer ? t / col_blocks : t % row_blocks;
      const int64_t col0 = nb * kNR, ncols = std::min<int64_t>(kNR, N - col0);
      const int64_t m_end = std::min(M, (rb + 1) * kRowBlock);
      for (int64_t m = rb * kRowBlock; m < m_end; m += kMR) {
        const int rows = static_cast<int>(std::min<int64_t>(kMR, m_end - m));
        kTiles<C>[rows](a + m * a_rs, a_rs, a_ks, b + col0, ldb, Kp, c + m * ldc + col0, ldc, static_cast<int>(ncols),
                        ep, col0, ep.keep ? ep.keep + m * ep.ld_keep + col0 : nullptr,
                        ep.addend ? ep.addend + m * ep.ld_addend + col0 : nullptr);
      }
    }
  });
}

}  // namespace

void gemm(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b, int64_t ldb, int64_t M, int64_t N,
          int64_t Kp, uint16_t* c, int64_t ldc, const Epilogue& ep) {
  gemm_into<uint16_t>(a, a_rs, a_ks, b, ldb, M, N, Kp, c, ldc, ep);
}

void gemm(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b, int64_t ldb, int64_t M, int64_t N,
          int64_t Kp, float* c, int64_t ldc, const Epilogue& ep) {
  gemm_into<float>(a, a_rs, a_ks, b, ldb, M, N, Kp, c, ldc, ep);
}

void pack_row_pairs(const uint16_t* x, int64_t ld, int64_t rows, int64_t cols, uint32_t* out) {
  const int64_t pairs = (rows + 1) / 2;
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint16_t* r0 = x + 2 * kp * ld;
    const bool has_r1 = 2 * kp + 1 < rows;
    uint32_t* dst = out + kp * cols;
    int64_t col = 0;
    for (; col + 32 <= cols; col += 32) {
      const __m512i v0 = _mm512_loadu_si512(r0 + col);
      const __m512i v1 = has_r1 ? _mm512_loadu_si512(r0 + ld + col) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + col, _mm512_permutex2var_epi16(v0, lo, v1));
      _mm512_storeu_si512(dst + col + 16, _mm512_permutex2var_epi16(v0, hi, v1));
    }
    for (; col < cols; ++col)
      dst[col] = static_cast<uint32_t>(r0[col]) | (has_r1 ? static_cast<uint32_t>(r0[ld + col]) << 16 : 0u);
  }
}

// In-register transpose of a 16 x 16 block of 32-bit words: r[i] holds row i, becomes column i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + c], 128-bit lane j: rows 4i..4i+3 of column 4j + c
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), s1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                  s3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

void pack_transposed(const uint16_t* w, int64_t ld, int64_t n, int64_t k, uint32_t* out) {
  // out[kp][j] = word kp of row j (the pair w[j][2kp], w[j][2kp + 1]): a 32-bit transpose
  const int64_t words = k / 2;
  auto word = [&](int64_t j, int64_t kp) {
    uint32_t v;
    std::memcpy(&v, w + j * ld + 2 * kp, 4);
    return v;
  };
  // Blocks of 16 x 16 words, across the output's rows first: consecutive blocks fill
  // neighbouring 64-byte pieces of the same 16 output rows (down the columns, the stores of a
  // block land 4 * n bytes apart and, for n = 512, in two cache sets).
  const int64_t n16 = n / 16 * 16, words16 = words / 16 * 16;
  for (int64_t k0 = 0; k0 < words16; k0 += 16) {
    for (int64_t j0 = 0; j0 < n16; j0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(w + (j0 + i) * ld + 2 * k0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (k0 + i) * n + j0, r[i]);
    }
  }
  for (int64_t kp = 0; kp < words; ++kp)  // the ragged edges
    for (int64_t j = kp < words16 ? n16 : 0; j < n; ++j) out[kp * n + j] = word(j, kp);
}

#else

bool available() { return false; }
void pack_row_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void pack_transposed(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void gemm(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*, int64_t,
          const Epilogue&) {}
void gemm(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
          const Epilogue&) {}

#endif

}  // namespace moe_scale::bf16
