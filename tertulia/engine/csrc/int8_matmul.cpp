// The LM head: y = (x W^T) * scale for int8 weights with one float32 scale per output, on CPUs with
// AVX512-BF16, float32 logits out.
//
// PyTorch's int8 weight-only kernel converts every weight to float once per few rows, so at sixteen
// rows it converted the head's 28 million weights four times a step. Here a block of 32 outputs is
// converted once into bf16 (an int8 value is exact in bf16), kept in a per-thread buffer, and every
// row of the call multiplies it with the bf16 dot-product instruction; products of two bf16 numbers
// are exact in float32. The logits leave in float32 (PyTorch's kernel rounds them to bf16, a step of
// 1/8 at a logit of 20, which turns near-ties into exact ties).
//
// One output's arithmetic is a fixed sequence whatever the rows, the threads or which thread takes
// the block: the even input pairs summed in order, the odd pairs in order, the two sums added, then
// multiplied by the scale. A row's logits never depend on the other rows of the call.
//
// Layout (quant.pack_head packs it): weights in blocks of 32 outputs, two tiles of 16, stored block
// by block and in a block pair by pair: packed int8 [blocks, in / 2, 2 tiles, 32 bytes], byte 16j + i
// of a tile's 32 holding output i's weight at input 2p + j. Scales: float32 [out].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "block_runs.h"

namespace {

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

constexpr int64_t kTile = 16;
constexpr int kTiles = 2;
constexpr int64_t kBlock = kTile * kTiles;
constexpr int64_t kAhead = 2048;  // bytes of weights prefetched ahead of the conversion

bool cpu_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return supported;
}

// A block's int8 weights as bf16 pairs, one register of 16 outputs' (2p, 2p + 1) per pair and tile.
// A float32 of an int8 value has at most 8 significant bits, so its upper half is its exact bf16:
// the pair is input 2p's upper half moved down, joined to input 2p + 1's upper half.
BF16_TARGET void convert(const int8_t* block, int64_t pairs, __m512i* out) {
  const __m512i upper = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t i = 0; i < pairs * kTiles; ++i) {
    // The stream kAhead bytes ahead, into the next block at the end (a prefetch past the weights'
    // end is harmless): the hardware prefetcher alone kept only a third of the memory bandwidth busy.
    if (i % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(block + 32 * i + kAhead), _MM_HINT_T0);
    const __m128i* bytes = reinterpret_cast<const __m128i*>(block + 32 * i);
    const __m512i even = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes))));
    const __m512i odd = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1))));
    // (even >> 16) | (odd & upper): truth table 0xF8 is A | (B & C) for A = even >> 16, B = odd, C = upper.
    out[i] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(even, 16), odd, upper, 0xF8);
  }
}

// R rows against the block's two tiles over all inputs; two chains per sum (even and odd pairs).
template <int R>
BF16_TARGET inline void rows(const uint16_t* x, int64_t K, int64_t m, const __m512i* weights,
                             const float* scale, float* y, int64_t N, int64_t index) {
  __m512 even[R][kTiles], odd[R][kTiles];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < kTiles; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; p += 2) {
    __m512bh xe[R], xo[R];
    for (int r = 0; r < R; ++r) {
      int lanes[2];  // inputs 2p, 2p + 1 and 2p + 2, 2p + 3, each pair one 32-bit lane
      std::memcpy(lanes, x + (m + r) * K + 2 * p, sizeof lanes);
      xe[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(lanes[0]));
      xo[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(lanes[1]));
    }
    for (int t = 0; t < kTiles; ++t) {
      const __m512bh we = reinterpret_cast<__m512bh>(_mm512_load_si512(weights + p * kTiles + t));
      const __m512bh wo = reinterpret_cast<__m512bh>(_mm512_load_si512(weights + (p + 1) * kTiles + t));
      for (int r = 0; r < R; ++r) {
        even[r][t] = _mm512_dpbf16_ps(even[r][t], we, xe[r]);
        odd[r][t] = _mm512_dpbf16_ps(odd[r][t], wo, xo[r]);
      }
    }
  }
  for (int t = 0; t < kTiles; ++t) {
    const __m512 factor = _mm512_loadu_ps(scale + index * kBlock + t * kTile);
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(y + (m + r) * N + index * kBlock + t * kTile,
                       _mm512_mul_ps(_mm512_add_ps(even[r][t], odd[r][t]), factor));
  }
}

BF16_TARGET void block(const uint16_t* x, int64_t M, int64_t K, const int8_t* packed, const float* scale,
                       float* y, int64_t N, int64_t index, __m512i* weights) {
  const int64_t pairs = K / 2;
  const int8_t* source = packed + index * kBlock * K;
  convert(source, pairs, weights);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows<4>(x, K, m, weights, scale, y, N, index);
  for (; m + 2 <= M; m += 2) rows<2>(x, K, m, weights, scale, y, N, index);
  for (; m < M; ++m) rows<1>(x, K, m, weights, scale, y, N, index);
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(cpu_supported(), "tertulia::int8_mm needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [rows, in]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == kTiles &&
                  packed.size(3) == 2 * kTile && packed.is_contiguous(),
              "packed: int8 [out / 32, in / 2, 2, 32]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  const int64_t N = blocks * kBlock;
  TORCH_CHECK(K == 2 * packed.size(1) && K % 4 == 0, "x has ", K, " inputs, the weights ", 2 * packed.size(1),
              " (a multiple of 4)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale: float32 [out]");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  tertulia::for_each_block(
      blocks, 8, [&] { return tertulia::aligned<__m512i>(K / 2 * kTiles * sizeof(__m512i)); },
      [&](int64_t index, tertulia::Aligned<__m512i>& weights) { block(xp, M, K, wp, sp, yp, N, index, weights.get()); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tertulia, m) {
  m.def("int8_mm(Tensor x, Tensor packed, Tensor scale) -> Tensor", &int8_mm);
}
