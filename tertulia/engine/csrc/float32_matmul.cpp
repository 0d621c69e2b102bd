// y = x W^T (+ b) for float32 weights, on CPUs with AVX2 and FMA: the engine's float32 layers.
//
// PyTorch's float32 GEMM reads a decode step's weights at about half the memory bandwidth at one
// row, and takes other code paths (other roundings) for other row counts, so a row's numbers depend
// on how many rows share the call. Here the weights are laid out for the call (blocks of 16 outputs,
// input by input) and each output is one chain of fused multiply-adds over the inputs in order,
// whatever the rows, the threads or which thread takes the block: a row's result never depends on
// the other rows.
//
// Layout (quant.Float32Linear packs it): float32 [out / 16, in, 16], output 16b + i's weight for
// input k at [b, k, i].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "avx2_math.h"
#include "block_runs.h"

namespace {

using tertulia::avx2::cpu_supported;

constexpr int64_t kBlock = 16;
constexpr int64_t kAhead = 64;  // inputs of the block prefetched ahead (4 KB)

// R rows of x against one block of 16 outputs.
template <int R>
AVX2_TARGET inline void rows(const float* x, int64_t K, int64_t m, const float* weights, const float* bias,
                             float* y, int64_t N, int64_t index) {
  __m256 low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(weights + (k + kAhead) * kBlock), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(weights + k * kBlock);
    const __m256 w1 = _mm256_loadu_ps(weights + k * kBlock + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 value = _mm256_broadcast_ss(x + (m + r) * K + k);
      low[r] = _mm256_fmadd_ps(value, w0, low[r]);
      high[r] = _mm256_fmadd_ps(value, w1, high[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* out = y + (m + r) * N + index * kBlock;
    if (bias != nullptr) {
      low[r] = _mm256_add_ps(low[r], _mm256_loadu_ps(bias + index * kBlock));
      high[r] = _mm256_add_ps(high[r], _mm256_loadu_ps(bias + index * kBlock + 8));
    }
    _mm256_storeu_ps(out, low[r]);
    _mm256_storeu_ps(out + 8, high[r]);
  }
}

AVX2_TARGET void block(const float* x, int64_t M, int64_t K, const float* packed, const float* bias, float* y,
                       int64_t N, int64_t index) {
  const float* weights = packed + index * K * kBlock;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows<4>(x, K, m, weights, bias, y, N, index);
  for (; m + 2 <= M; m += 2) rows<2>(x, K, m, weights, bias, y, N, index);
  for (; m < M; ++m) rows<1>(x, K, m, weights, bias, y, N, index);
}

at::Tensor float32_mm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_supported(), "tertulia::float32_mm needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, in]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.size(2) == kBlock &&
                  packed.is_contiguous(),
              "packed: float32 [out / 16, in, 16]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * kBlock;
  TORCH_CHECK(K == packed.size(1), "x has ", K, " inputs, the weights ", packed.size(1));
  const float* added = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: float32 [out]");
    added = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  tertulia::for_each_block(
      blocks, 8, [] { return 0; }, [&](int64_t index, int) { block(xp, M, K, wp, added, yp, N, index); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tertulia, m) {
  m.def("float32_mm(Tensor x, Tensor packed, Tensor? bias) -> Tensor", &float32_mm);
}
