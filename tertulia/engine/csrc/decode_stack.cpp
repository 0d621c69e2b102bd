// The decoder layers of one batched decode step, in C++, two ways. Fused (the default where
// decode_ops.cpp runs): nine calls per layer, the small ops between the matmuls fused; the same
// function as the Python path with other roundings. Unfused: the same ATen calls, in the same order
// and on the same shapes, as models/llama.py's DecoderLayer with attention.py's DecodeAttention and
// quant.py's Int4Linear (with whichever int4 kernel its weights were packed for), so the numbers are
// bit for bit those of the Python path, which stays the reference.
//
// It knows nothing of sequences or sampling: it gets the step's hidden states, rotations, where to
// write each new key and value, and what attention reads: each sequence's block table and length
// (decode_attention.cpp), or where that kernel does not run, the buckets (rows, gathered pool
// positions, mask).

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

using at::Tensor;
using at::indexing::Slice;

namespace tertulia {
Tensor int4_matmul(const Tensor& x, const Tensor& packed, const Tensor& scales);  // int4_matmul.cpp
Tensor decode_attention(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& tables,
                        const Tensor& lengths, int64_t block_size);  // decode_attention.cpp
// decode_ops.cpp
Tensor fused_add_rms_norm(Tensor x, const c10::optional<Tensor>& residual, const Tensor& weight, double eps);
Tensor fused_rotary_split(const Tensor& projected, const c10::optional<Tensor>& bias, const Tensor& rotations,
                          Tensor keys, Tensor values, const Tensor& written, int64_t heads);
Tensor fused_silu_mul(const Tensor& gate_up);
}

struct DecodeStack : torch::CustomClassHolder {
  // Per layer: norms, int4-packed projections (weight, scales-and-zeros), optional q/k/v bias, and
  // that layer's key and value pools [kv_heads, positions, head_dim].
  std::vector<Tensor> input_norm, post_norm, qkv, qkv_scales, qkv_bias, o, o_scales, gate_up,
      gate_up_scales, down, down_scales, keys, values;
  int64_t heads, kv_heads, head_dim, group_size;
  double eps;
  bool fused;  // the small ops of a layer fused (decode_ops.cpp), or the Python path's ATen calls

  DecodeStack(std::vector<Tensor> input_norm, std::vector<Tensor> post_norm, std::vector<Tensor> qkv,
              std::vector<Tensor> qkv_scales, std::vector<Tensor> qkv_bias, std::vector<Tensor> o,
              std::vector<Tensor> o_scales, std::vector<Tensor> gate_up,
              std::vector<Tensor> gate_up_scales, std::vector<Tensor> down,
              std::vector<Tensor> down_scales, std::vector<Tensor> keys, std::vector<Tensor> values,
              int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t group_size, double eps, bool fused)
      : input_norm(std::move(input_norm)), post_norm(std::move(post_norm)), qkv(std::move(qkv)),
        qkv_scales(std::move(qkv_scales)), qkv_bias(std::move(qkv_bias)), o(std::move(o)),
        o_scales(std::move(o_scales)), gate_up(std::move(gate_up)),
        gate_up_scales(std::move(gate_up_scales)), down(std::move(down)),
        down_scales(std::move(down_scales)), keys(std::move(keys)), values(std::move(values)),
        heads(heads), kv_heads(kv_heads), head_dim(head_dim), group_size(group_size), eps(eps), fused(fused) {}

  // quant.Int4Linear.forward: the layout of `packed` says which kernel it was packed for.
  Tensor int4_linear(const Tensor& x, const Tensor& packed, const Tensor& scales) const {
    if (packed.dim() == 4) return tertulia::int4_matmul(x, packed, scales);
    return at::_weight_int4pack_mm_for_cpu(x, packed, group_size, scales);
  }

  // attention.attend: softmax(q k^T / sqrt(d) + bias) v as two batched matmuls.
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) const {
    Tensor scores = at::matmul(q, k.transpose(-1, -2));
    scores.mul_(std::pow(static_cast<double>(q.size(-1)), -0.5)).add_(bias);
    return at::matmul(at::softmax(scores, -1), v);
  }

  // x: [N, hidden] float32; rotations: [N, 1, head_dim / 2] complex64; written: [N] pool positions;
  // attention read in place (block_size > 0): each sequence's block table and length; else, per
  // bucket: its rows of the batch, its gathered pool positions, its span and its mask.
  Tensor forward(Tensor x, Tensor rotations, Tensor written, Tensor tables, Tensor lengths, int64_t block_size,
                 std::vector<Tensor> bucket_rows, std::vector<Tensor> bucket_where,
                 std::vector<int64_t> bucket_span, std::vector<Tensor> bucket_bias) {
    if (fused)
      return forward_fused(x, rotations, written, tables, lengths, block_size, bucket_rows, bucket_where,
                           bucket_span, bucket_bias);
    const int64_t n = x.size(0);
    const int64_t hidden = x.size(1);
    const int64_t both = heads + kv_heads;
    const int64_t rotary_width = both * head_dim;
    for (size_t layer = 0; layer < input_norm.size(); ++layer) {
      Tensor h = at::rms_norm(x, {hidden}, input_norm[layer], eps).to(at::kBFloat16);
      Tensor projected = int4_linear(h, qkv[layer], qkv_scales[layer]);
      if (!qkv_bias.empty()) projected = projected + qkv_bias[layer];
      projected = projected.to(at::kFloat);
      Tensor qk = at::view_as_complex(
          projected.index({Slice(), Slice(0, rotary_width)}).reshape({n, both, head_dim / 2, 2}));
      qk = at::view_as_real(qk * rotations).reshape({n, both, head_dim});
      Tensor v = projected.index({Slice(), Slice(rotary_width, at::indexing::None)})
                     .reshape({n, kv_heads, head_dim});
      Tensor q = qk.index({Slice(), Slice(0, heads)});
      Tensor k = qk.index({Slice(), Slice(heads, at::indexing::None)});

      Tensor& key_pool = keys[layer];
      Tensor& value_pool = values[layer];
      key_pool.index_copy_(1, written, k.transpose(0, 1));
      value_pool.index_copy_(1, written, v.transpose(0, 1));
      Tensor attended =
          block_size > 0
              ? tertulia::decode_attention(q.contiguous(), key_pool, value_pool, tables, lengths, block_size)
                    .view({n, heads * head_dim})
              : bucketed(q, key_pool, value_pool, bucket_rows, bucket_where, bucket_span, bucket_bias);
      x = x + int4_linear(attended.to(at::kBFloat16), o[layer], o_scales[layer]);
      h = at::rms_norm(x, {hidden}, post_norm[layer], eps).to(at::kBFloat16);
      std::vector<Tensor> halves = int4_linear(h, gate_up[layer], gate_up_scales[layer]).chunk(2, -1);
      x = x + int4_linear(at::silu(halves[0]) * halves[1], down[layer], down_scales[layer]);
    }
    return x;
  }

  // The same layers with the small ops fused: x, the residual stream, is updated in place, and each
  // layer's last matmul output is added to it by the next layer's norm.
  Tensor forward_fused(const Tensor& embedded, const Tensor& rotations, const Tensor& written, const Tensor& tables,
                       const Tensor& lengths, int64_t block_size, const std::vector<Tensor>& bucket_rows,
                       const std::vector<Tensor>& bucket_where, const std::vector<int64_t>& bucket_span,
                       const std::vector<Tensor>& bucket_bias) {
    const int64_t n = embedded.size(0);
    Tensor x = embedded.contiguous().clone();
    c10::optional<Tensor> pending;
    for (size_t layer = 0; layer < input_norm.size(); ++layer) {
      Tensor h = tertulia::fused_add_rms_norm(x, pending, input_norm[layer], eps);
      c10::optional<Tensor> bias;
      if (!qkv_bias.empty()) bias = qkv_bias[layer];
      Tensor q = tertulia::fused_rotary_split(int4_linear(h, qkv[layer], qkv_scales[layer]), bias, rotations,
                                              keys[layer], values[layer], written, heads);
      Tensor attended =
          block_size > 0
              ? tertulia::decode_attention(q, keys[layer], values[layer], tables, lengths, block_size)
                    .view({n, heads * head_dim})
              : bucketed(q, keys[layer], values[layer], bucket_rows, bucket_where, bucket_span, bucket_bias);
      Tensor out = int4_linear(attended.to(at::kBFloat16), o[layer], o_scales[layer]);
      h = tertulia::fused_add_rms_norm(x, out, post_norm[layer], eps);
      Tensor act = tertulia::fused_silu_mul(int4_linear(h, gate_up[layer], gate_up_scales[layer]));
      pending = int4_linear(act, down[layer], down_scales[layer]);
    }
    if (pending.has_value()) x.add_(*pending);
    return x;
  }

  // attention.DecodeAttention over buckets (where attention cannot read the pool in place):
  // [n, heads * head_dim].
  Tensor bucketed(const Tensor& q, const Tensor& key_pool, const Tensor& value_pool,
                  const std::vector<Tensor>& bucket_rows, const std::vector<Tensor>& bucket_where,
                  const std::vector<int64_t>& bucket_span, const std::vector<Tensor>& bucket_bias) const {
    const int64_t n = q.size(0);
    const int64_t group = heads / kv_heads;
    Tensor grouped = q.view({n, heads / group, group, head_dim}).transpose(0, 1).contiguous();
    Tensor out;
    if (bucket_rows.size() == 1) {
      out = attend(grouped, read(key_pool, bucket_where[0], bucket_span[0]),
                   read(value_pool, bucket_where[0], bucket_span[0]), bucket_bias[0]);
    } else {
      out = at::empty_like(grouped);
      for (size_t b = 0; b < bucket_rows.size(); ++b) {
        Tensor rows = bucket_rows[b];
        Tensor part = attend(grouped.index({Slice(), rows}), read(key_pool, bucket_where[b], bucket_span[b]),
                             read(value_pool, bucket_where[b], bucket_span[b]), bucket_bias[b]);
        out.index_put_({Slice(), rows}, part);
      }
    }
    return out.transpose(0, 1).reshape({n, heads * head_dim});
  }

  // attention._Bucket.read: [kv_heads, count, span, head_dim], each sequence's matrix contiguous;
  // `where` indexes the pool's rows seen as [kv_heads * positions, head_dim].
  static Tensor read(const Tensor& pool, const Tensor& where, int64_t span) {
    Tensor gathered = pool.view({-1, pool.size(2)}).index_select(0, where);
    return gathered.view({pool.size(0), where.size(0) / (pool.size(0) * span), span, pool.size(2)});
  }
};

TORCH_LIBRARY(tertulia, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, int64_t, int64_t, int64_t, int64_t, double, bool>())
      .def("forward", &DecodeStack::forward);
}
