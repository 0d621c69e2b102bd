// Attention straight from the paged KV pool, on CPUs with AVX2 and FMA, float32 throughout. Each
// query row comes with its sequence's block table and its length (its position + 1): a decode step
// sends one row per sequence, a prefill step one row per prompt token (attention.py), so a row's
// numbers are the same whichever kind of step computed it.
//
// The matmul path (attention.py's buckets) first gathers each sequence's keys and values from their
// blocks into one matrix, pads it to a multiple of 128 positions and masks the padding: at sixteen
// streams the gather and the padded matmuls were a third of a decode step, and every key and value
// crossed memory three times. Here each (sequence, query head) reads its keys and values where they
// lie, once, and nothing is padded.
//
// A row's numbers depend on nothing but its own query and cache: each (row, head) is one task with a
// fixed sequence of operations (every dot product in the same order, the softmax's sum eight lanes
// wide then reduced in one fixed order, the weighted values summed position by position), whatever
// the batch, the thread count or which thread runs it. The engine's batch invariance, prefix-cache
// hits giving a cold run's logits, and the unfused C++ stack's agreement with the Python path rest
// on it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "avx2_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using tertulia::avx2::cpu_supported;
using tertulia::avx2::exp_nonpositive;
using tertulia::avx2::kLanes;
using tertulia::avx2::lanes_sum;

// Dot products of one query with four key rows (four independent chains, each in the same order as a
// lone row's would be).
AVX2_TARGET inline void dots4(const float* q, const float* const* k, int64_t D, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < D; c += kLanes) {
    const __m256 query = _mm256_loadu_ps(q + c);
    for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(query, _mm256_loadu_ps(k[i] + c), acc[i]);
  }
  for (int i = 0; i < 4; ++i) out[i] = lanes_sum(acc[i]);
}

AVX2_TARGET inline float dot1(const float* q, const float* k, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += kLanes) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), acc);
  return lanes_sum(acc);
}

struct Pools {
  const float* keys;
  const float* values;
  int64_t positions;  // per kv head
  int64_t D;
  const int64_t* tables;
  int64_t table_width;
  int64_t block_size;

  // Where positions 0..length-1 of sequence b's kv head h lie, as element offsets into a pool (block
  // by block: no division per position).
  void offsets(int64_t b, int64_t h, int64_t length, std::vector<int64_t>& out) const {
    out.resize(length);
    for (int64_t first = 0, block = 0; first < length; first += block_size, ++block) {
      const int64_t row = h * positions + tables[b * table_width + block] * block_size;
      for (int64_t j = first; j < std::min(length, first + block_size); ++j) out[j] = (row + j - first) * D;
    }
  }
};

// softmax(q k^T / sqrt(D)) v for one query head of one sequence, its positions at `at`.
AVX2_TARGET void attend_one(const Pools& pools, const float* q, const int64_t* at, int64_t length, float scale,
                            float* s, float* out) {
  const int64_t D = pools.D;
  const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
  int64_t j = 0;
  for (; j + 4 <= length; j += 4) {
    const float* rows[4] = {pools.keys + at[j], pools.keys + at[j + 1], pools.keys + at[j + 2], pools.keys + at[j + 3]};
    dots4(q, rows, D, s + j);
  }
  for (; j < length; ++j) s[j] = dot1(q, pools.keys + at[j], D);
  float top = -INFINITY;
  for (j = 0; j < length; ++j) {
    s[j] *= scale;
    top = std::max(top, s[j]);
  }
  // Exponentials eight at a time; the padding after the last position counts as zero.
  __m256 total = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(top);
  for (j = 0; j < padded; j += kLanes) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    if (j + kLanes > length) {
      const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(length)), index)));
    }
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  const __m256 norm = _mm256_set1_ps(lanes_sum(total));
  // The weighted values, 64 dimensions at a time in eight registers, position after position.
  for (int64_t c0 = 0; c0 < D; c0 += 8 * kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(8, (D - c0) / kLanes));
    __m256 acc[8];
    for (int c = 0; c < width; ++c) acc[c] = _mm256_setzero_ps();
    for (j = 0; j < length; ++j) {
      const __m256 weight = _mm256_set1_ps(s[j]);
      const float* v = pools.values + at[j] + c0;
      for (int c = 0; c < width; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + c * kLanes), acc[c]);
    }
    for (int c = 0; c < width; ++c) _mm256_storeu_ps(out + c0 + c * kLanes, _mm256_div_ps(acc[c], norm));
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                  const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size) {
  TORCH_CHECK(cpu_supported(), "tertulia::paged_decode_attention needs a CPU with AVX2 and FMA");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [batch, heads, dim]");
  TORCH_CHECK(keys.dim() == 3 && keys.scalar_type() == at::kFloat && keys.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "keys, values: contiguous float32 [kv_heads, positions, dim], the same shape");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = keys.size(0);
  TORCH_CHECK(D == keys.size(2) && D % kLanes == 0, "head dim ", D, " must match the pools' and be a multiple of 8");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, H, " query heads cannot share ", KVH, " kv heads");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kLong && tables.is_contiguous(),
              "tables: contiguous int64 [batch, blocks]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "lengths: int64 [batch]");
  TORCH_CHECK(block_size > 0 && keys.size(1) % block_size == 0, "block size ", block_size, " must divide the pool");
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(length[b] > 0 && length[b] <= tables.size(1) * block_size, "sequence ", b, " has length ", length[b],
                " for a table of ", tables.size(1), " blocks");
  at::Tensor out = at::empty_like(q);
  const Pools pools{keys.data_ptr<float>(), values.data_ptr<float>(), keys.size(1), D,
                    tables.data_ptr<int64_t>(), tables.size(1), block_size};
  const int64_t blocks_in_pool = keys.size(1) / block_size;
  const int64_t* table = tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < tables.numel(); ++i)
    TORCH_CHECK(table[i] >= 0 && table[i] < blocks_in_pool, "block ", table[i], " is outside the pool");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / KVH;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> at;
    int64_t located = -1;  // the (sequence, kv head) whose positions `at` holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, kv_head = task % H / group;
      if (located != b * KVH + kv_head) {
        pools.offsets(b, kv_head, length[b], at);
        located = b * KVH + kv_head;
      }
      scores.resize((length[b] + kLanes - 1) / kLanes * kLanes);
      attend_one(pools, qp + task * D, at.data(), length[b], scale, scores.data(), op + task * D);
    }
  });
  return out;
}

}  // namespace

namespace tertulia {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size) {
  RECORD_FUNCTION("tertulia::paged_decode_attention", std::vector<c10::IValue>());
  return paged_decode_attention(q, keys, values, tables, lengths, block_size);
}
}  // namespace tertulia

TORCH_LIBRARY_FRAGMENT(tertulia, m) {
  m.def("paged_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor lengths, int block_size) -> Tensor",
        &paged_decode_attention);
  m.def("paged_decode_attention_supported() -> bool", [] { return cpu_supported(); });
}
