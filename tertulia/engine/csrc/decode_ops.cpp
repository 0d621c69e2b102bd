// The small operations between a decode layer's matmuls, fused, for CPUs with AVX2 and FMA.
//
// At one stream a decode layer made about forty ATen calls on rows of a few hundred numbers: each
// call's dispatch, allocation and iterator setup cost more than its arithmetic, together about as
// much as the layer's int4 matmuls. The decode stack (decode_stack.cpp) calls these three instead:
//
//   add_rms_norm   x += the previous matmul's bf16 output (the residual), then RMSNorm to bf16;
//   rotary_split   q/k/v from the fused projection (+ bias): q and k rotated, q returned, k and v
//                  written straight into the KV pools at each row's position;
//   silu_mul       SiLU(gate) * up, to bf16 (one rounding, where the ATen sequence rounded twice).
//
// Every row is computed on its own by a fixed sequence of operations, so a sequence's numbers do not
// depend on the batch. They are not the ATen sequence's bits (another sum order in RMSNorm, another
// exp in SiLU): the fused stack agrees with the Python forward to float32 rounding, and the unfused
// stack (the same ATen calls as Python) remains for the bit-for-bit reference.

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "avx2_math.h"

namespace {

using namespace tertulia::avx2;

AVX2_TARGET void add_rms_norm_rows(float* x, const uint16_t* residual, const float* weight, int64_t n, int64_t H,
                                   float eps, uint16_t* out) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * H;
    __m256 squares = _mm256_setzero_ps();
    for (int64_t c = 0; c < H; c += kLanes) {
      __m256 v = _mm256_loadu_ps(row + c);
      if (residual != nullptr) {
        v = _mm256_add_ps(v, load_bf16(residual + r * H + c));
        _mm256_storeu_ps(row + c, v);
      }
      squares = _mm256_fmadd_ps(v, v, squares);
    }
    const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(lanes_sum(squares) / static_cast<float>(H) + eps));
    for (int64_t c = 0; c < H; c += kLanes)
      store_bf16(out + r * H + c,
                 _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + c), scale), _mm256_loadu_ps(weight + c)));
  }
}

at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK(cpu_supported(), "tertulia::add_rms_norm needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) % kLanes == 0,
              "x: contiguous float32 [rows, hidden], hidden a multiple of 8");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight: float32 [hidden]");
  const uint16_t* added = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kBFloat16 && residual->is_contiguous() &&
                    residual->sizes() == x.sizes(),
                "residual: contiguous bf16, x's shape");
    added = reinterpret_cast<const uint16_t*>(residual->data_ptr());
  }
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  add_rms_norm_rows(x.data_ptr<float>(), added, weight.data_ptr<float>(), x.size(0), x.size(1),
                    static_cast<float>(eps), reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// One head's pairs (a, b) rotated by (cos, sin): (a cos - b sin, a sin + b cos), interleaved.
AVX2_TARGET inline void rotate(const uint16_t* source, const float* bias, const float* rotation, int64_t D,
                               float* out) {
  for (int64_t c = 0; c < D; c += kLanes) {
    __m256 v = load_bf16(source + c);
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
    const __m256 turn = _mm256_loadu_ps(rotation + c);               // c0 s0 c1 s1 ...
    const __m256 cosines = _mm256_moveldup_ps(turn);                 // c0 c0 c1 c1 ...
    const __m256 sines = _mm256_movehdup_ps(turn);                   // s0 s0 s1 s1 ...
    const __m256 swapped = _mm256_permute_ps(v, 0b10110001);         // b0 a0 b1 a1 ...
    // a c - b s in the even lanes, b c + a s in the odd ones.
    _mm256_storeu_ps(out + c, _mm256_fmaddsub_ps(v, cosines, _mm256_mul_ps(swapped, sines)));
  }
}

AVX2_TARGET void rotary_split_rows(const uint16_t* projected, const float* bias, const float* rotations,
                                   const int64_t* written, int64_t n, int64_t heads, int64_t kv_heads, int64_t D,
                                   float* q, float* keys, float* values, int64_t positions) {
  const int64_t width = (heads + 2 * kv_heads) * D;
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* row = projected + r * width;
    const float* rotation = rotations + r * D;  // D / 2 (cos, sin) pairs
    for (int64_t h = 0; h < heads; ++h)
      rotate(row + h * D, bias ? bias + h * D : nullptr, rotation, D, q + (r * heads + h) * D);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t k_at = (heads + h) * D, v_at = (heads + kv_heads + h) * D;
      rotate(row + k_at, bias ? bias + k_at : nullptr, rotation, D, keys + (h * positions + written[r]) * D);
      float* value = values + (h * positions + written[r]) * D;
      for (int64_t c = 0; c < D; c += kLanes) {
        __m256 v = load_bf16(row + v_at + c);
        if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + v_at + c));
        _mm256_storeu_ps(value + c, v);
      }
    }
  }
}

at::Tensor rotary_split(const at::Tensor& projected, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& rotations, at::Tensor keys, at::Tensor values, const at::Tensor& written,
                        int64_t heads) {
  TORCH_CHECK(cpu_supported(), "tertulia::rotary_split needs a CPU with AVX2 and FMA");
  TORCH_CHECK(keys.dim() == 3 && keys.scalar_type() == at::kFloat && keys.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "keys, values: contiguous float32 [kv_heads, positions, dim], the same shape");
  const int64_t kv_heads = keys.size(0), D = keys.size(2), n = projected.size(0);
  TORCH_CHECK(D % kLanes == 0, "head dim ", D, " must be a multiple of 8");
  TORCH_CHECK(projected.dim() == 2 && projected.scalar_type() == at::kBFloat16 && projected.is_contiguous() &&
                  projected.size(1) == (heads + 2 * kv_heads) * D,
              "projected: contiguous bf16 [rows, (heads + 2 kv_heads) * dim]");
  TORCH_CHECK(rotations.scalar_type() == at::kComplexFloat && rotations.is_contiguous() &&
                  rotations.numel() == n * D / 2,
              "rotations: contiguous complex64 [rows, 1, dim / 2]");
  TORCH_CHECK(written.scalar_type() == at::kLong && written.is_contiguous() && written.numel() == n,
              "written: int64 [rows]");
  const int64_t* at = written.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(at[r] >= 0 && at[r] < keys.size(1), "position ", at[r], " is outside the pool");
  const float* added = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == projected.size(1),
                "bias: float32 [(heads + 2 kv_heads) * dim]");
    added = bias->data_ptr<float>();
  }
  at::Tensor q = at::empty({n, heads, D}, keys.options());
  rotary_split_rows(reinterpret_cast<const uint16_t*>(projected.data_ptr()), added,
                    reinterpret_cast<const float*>(rotations.data_ptr()), at, n, heads, kv_heads, D,
                    q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), keys.size(1));
  return q;
}

AVX2_TARGET void silu_mul_rows(const uint16_t* gate_up, int64_t n, int64_t I, uint16_t* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* gate = gate_up + r * 2 * I;
    for (int64_t c = 0; c < I; c += kLanes) {
      const __m256 g = load_bf16(gate + c);
      // sigmoid(g) from e^-|g| (never overflows): 1 / (1 + e) for g >= 0, e / (1 + e) below.
      const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));
      const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
      store_bf16(out + r * I + c, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), load_bf16(gate + I + c)));
    }
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(cpu_supported(), "tertulia::silu_mul needs a CPU with AVX2 and FMA");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kBFloat16 && gate_up.is_contiguous() &&
                  gate_up.size(1) % (2 * kLanes) == 0,
              "gate_up: contiguous bf16 [rows, 2 * ffn], ffn a multiple of 8");
  const int64_t n = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({n, I}, gate_up.options());
  silu_mul_rows(reinterpret_cast<const uint16_t*>(gate_up.data_ptr()), n, I,
                reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

}  // namespace

namespace tertulia {
// For decode_stack.cpp, which calls them directly (no dispatcher between the ops of a layer): named
// for the profiler all the same.
at::Tensor fused_add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                              double eps) {
  RECORD_FUNCTION("tertulia::add_rms_norm", std::vector<c10::IValue>());
  return add_rms_norm(std::move(x), residual, weight, eps);
}
at::Tensor fused_rotary_split(const at::Tensor& projected, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& rotations, at::Tensor keys, at::Tensor values,
                              const at::Tensor& written, int64_t heads) {
  RECORD_FUNCTION("tertulia::rotary_split", std::vector<c10::IValue>());
  return rotary_split(projected, bias, rotations, std::move(keys), std::move(values), written, heads);
}
at::Tensor fused_silu_mul(const at::Tensor& gate_up) {
  RECORD_FUNCTION("tertulia::silu_mul", std::vector<c10::IValue>());
  return silu_mul(gate_up);
}
}  // namespace tertulia

TORCH_LIBRARY_FRAGMENT(tertulia, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("rotary_split(Tensor projected, Tensor? bias, Tensor rotations, Tensor(a!) keys, Tensor(b!) values, "
        "Tensor written, int heads) -> Tensor",
        &rotary_split);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("decode_ops_supported() -> bool", [] { return cpu_supported(); });
}
