// y = x W^T for 4-bit weights in groups of 32 along the input, on CPUs with AVX512-BF16.
//
// PyTorch's packed int4 kernel turns every weight into float32 once per block of rows, so at the 16
// rows of a 16-stream decode step, or the hundreds of a prefill, it spends more time converting
// weights than multiplying. Here a group of 32 weights of 16 outputs is unpacked once into bf16 pairs
// and used by every row of the call, multiplied with the dot-product instruction of AVX512-BF16.
//
// Each group's weights are (q - 8) * scale + zero, q in 0..15. q - 8 is exact in bf16 and a product
// of two bf16 numbers is exact in float32, so a group's sum is computed on the 4-bit values and the
// scale and zero are applied after it, in float32:
//     y += scale * sum_k x_k (q_k - 8)  +  zero * sum_k x_k
// One output's arithmetic is a fixed sequence (groups in order; in a group, the even pairs in order
// and the odd pairs in order, their two sums added, then the scale, then the zero), whatever the number of rows, the tiles a thread takes or the
// thread count: a row's result never depends on the other rows of the call. The engine relies on it.
//
// Layout (quant.py packs it): outputs in blocks of 32, two tiles of 16, stored block by block and,
// in a block, group by group, so that a thread reads one sequential stream: packed [blocks, groups,
// 2 tiles, 256 bytes]. (Blocks of 32 split the engine's layers evenly between threads.) Byte 2i + j of a tile's 32-byte chunk c holds, for output i of the tile, q at
// input 32g + 4c + j (low nibble) and at input 32g + 4c + 2 + j (high nibble); a chunk expands to
// two registers of 16 (k, k+1) pairs. Scales and zeros: float16 [blocks, groups, 2 tiles, 2, 16].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "block_runs.h"

namespace {

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 16;
constexpr int kTilesPerBlock = 2;
constexpr int64_t kAhead = 16;  // groups prefetched ahead of the one being multiplied
constexpr int64_t kRowChunk = 64;  // rows whose running sums stay in L1 while a group is reused

bool cpu_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return supported;
}

// bf16 bit patterns of (i & 15) - 8: the table vpermw reads with each 16-bit lane's low 5 bits.
struct Table {
  alignas(64) uint16_t entries[32];
  Table() {
    for (int i = 0; i < 32; ++i) {
      const float value = static_cast<float>((i & 15) - 8);
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      entries[i] = static_cast<uint16_t>(bits >> 16);
    }
  }
};
const Table kTable;

BF16_TARGET inline void unpack(const uint8_t* block, __m512i table, __m512i* pairs) {
  for (int c = 0; c < 8; ++c) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c)));
    pairs[2 * c] = _mm512_permutexvar_epi16(bytes, table);
    pairs[2 * c + 1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
  }
}

// R rows against the block's T tiles for one group. Each sum is two chains, the even and
// the odd pairs, added at the end: half the latency of one chain, for the few-row calls that have
// little else to overlap.
template <int R, int T>
BF16_TARGET inline void rows(const uint16_t* x, int64_t K, int64_t G, int64_t g, int64_t m,
                             const __m512i* pairs, const __m512* scale, const __m512* zero,
                             const float* xsum, float* sums, int64_t m0) {
  __m512 even[R][T], odd[R][T];
  const uint16_t* xr[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = x + (m + r) * K + g * kGroup;
    for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
  }
  for (int p = 0; p < 16; p += 2) {
    __m512bh xe[R], xo[R];
    for (int r = 0; r < R; ++r) {
      int pair[2];  // inputs 2p, 2p + 1 and 2p + 2, 2p + 3 of the group, each pair one 32-bit lane
      std::memcpy(pair, xr[r] + 2 * p, sizeof pair);
      xe[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair[0]));
      xo[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair[1]));
    }
    for (int t = 0; t < T; ++t) {
      const __m512bh we = reinterpret_cast<__m512bh>(_mm512_load_si512(pairs + t * 16 + p));
      const __m512bh wo = reinterpret_cast<__m512bh>(_mm512_load_si512(pairs + t * 16 + p + 1));
      for (int r = 0; r < R; ++r) {
        even[r][t] = _mm512_dpbf16_ps(even[r][t], we, xe[r]);
        odd[r][t] = _mm512_dpbf16_ps(odd[r][t], wo, xo[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 total = _mm512_set1_ps(xsum[(m + r) * G + g]);
    for (int t = 0; t < T; ++t) {
      float* out = sums + ((m - m0 + r) * T + t) * kTile;
      __m512 o = _mm512_loadu_ps(out);
      o = _mm512_fmadd_ps(_mm512_add_ps(even[r][t], odd[r][t]), scale[t], o);
      o = _mm512_fmadd_ps(zero[t], total, o);
      _mm512_storeu_ps(out, o);
    }
  }
}

// One block of 32 outputs (two tiles) for every row, a chunk of rows at a time.
BF16_TARGET void block(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed, const at::Half* scales,
                       const float* xsum, uint16_t* y, int64_t N, int64_t index, float* sums) {
  constexpr int T = kTilesPerBlock;
  const int64_t G = K / kGroup;
  const __m512i table = _mm512_load_si512(kTable.entries);
  alignas(64) __m512i pairs[T * 16];
  const uint8_t* weights = packed + index * G * T * 256;
  const at::Half* factors = scales + index * G * T * 32;
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t m1 = std::min(M, m0 + kRowChunk);
    for (int64_t i = 0; i < (m1 - m0) * T; ++i) _mm512_storeu_ps(sums + i * kTile, _mm512_setzero_ps());
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* group = weights + g * T * 256;
      // The stream a few groups ahead, weights and scales; a thread's blocks follow one another in
      // memory, so past this block's end is the next one's start (a prefetch past the end is harmless).
      for (int line = 0; line < T * 256; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(group + kAhead * T * 256 + line), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(factors + (g + kAhead) * T * 32), _MM_HINT_T0);
      __m512 scale[T], zero[T];
      for (int t = 0; t < T; ++t) {
        unpack(group + t * 256, table, pairs + t * 16);
        const at::Half* factor = factors + (g * T + t) * 32;
        scale[t] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(factor)));
        zero[t] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(factor + 16)));
      }
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4) rows<4, T>(x, K, G, g, m, pairs, scale, zero, xsum, sums, m0);
      for (; m + 2 <= m1; m += 2) rows<2, T>(x, K, G, g, m, pairs, scale, zero, xsum, sums, m0);
      for (; m < m1; ++m) rows<1, T>(x, K, G, g, m, pairs, scale, zero, xsum, sums, m0);
    }
    for (int64_t m = m0; m < m1; ++m) {
      for (int t = 0; t < T; ++t) {
        const __m256bh out = _mm512_cvtneps_pbh(_mm512_loadu_ps(sums + ((m - m0) * T + t) * kTile));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + (index * T + t) * kTile),
                            reinterpret_cast<__m256i>(out));
      }
    }
  }
}

// Sum of each group of 32 inputs of each row, in float32: the two halves added lane by lane, then the
// sixteen lanes reduced, always in the same order. (A scalar loop cost more than the matmul itself at
// one row: a chain of 32 dependent additions per group.)
BF16_TARGET void group_sums(const uint16_t* x, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const __m512i raw = _mm512_loadu_si512(x + i * kGroup);
    const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));  // even inputs
    const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(-65536)));  // odd
    out[i] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(cpu_supported(), "tertulia::int4_mm needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [rows, in]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.size(2) == kTilesPerBlock &&
                  packed.size(3) == 256 && packed.is_contiguous(),
              "packed: uint8 [out / 32, in / 32, 2, 256]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), G = packed.size(1);
  const int64_t N = blocks * kTilesPerBlock * kTile;
  TORCH_CHECK(K == G * kGroup, "x has ", K, " inputs, the weights ", G * kGroup);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == blocks * G * kTilesPerBlock * 2 * kTile,
              "scales: float16 [out / 32, in / 32, 2, 2, 16]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // The group sums: on the stack for the few rows of a decode step, else in a tensor.
  constexpr int64_t kOnStack = 1024;
  float stack_sums[kOnStack];
  at::Tensor heap_sums;
  float* xs = stack_sums;
  if (M * G > kOnStack) {
    heap_sums = at::empty({M, G}, x.options().dtype(at::kFloat));
    xs = heap_sums.data_ptr<float>();
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  group_sums(xp, M * G, xs);
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  tertulia::for_each_block(
      blocks, 4, [&] { return tertulia::aligned<float>(kRowChunk * kTilesPerBlock * kTile * sizeof(float)); },
      [&](int64_t index, tertulia::Aligned<float>& sums) { block(xp, M, K, wp, sp, xs, yp, N, index, sums.get()); });
  return y;
}

}  // namespace

namespace tertulia {
// For decode_stack.cpp, which calls it directly rather than through the dispatcher: named for the
// profiler all the same (a flag test when nobody profiles).
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  RECORD_FUNCTION("tertulia::int4_mm", std::vector<c10::IValue>());
  return int4_mm(x, packed, scales);
}
}  // namespace tertulia

TORCH_LIBRARY_FRAGMENT(tertulia, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales) -> Tensor", &int4_mm);
  m.def("int4_mm_supported() -> bool", [] { return cpu_supported(); });
}
