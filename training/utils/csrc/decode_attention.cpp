// One decoding step's attention on CPU: one bf16 query per row and head against that row's cached keys and values.
// See training/utils/model/decode_attention.py for why and when it is used.
#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;        // fp32 lanes of an AVX-512 register
constexpr int64_t kPrefetchRows = 16; // cached positions read ahead of the one being used

inline __m512 bf16_to_fp32(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void prefetch_row(const uint16_t* row, int64_t head_dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < head_dim * 2; byte += 64) _mm_prefetch(p + byte, _MM_HINT_T0);
}

// softmax(scale * q.K^T over the allowed positions) . V for one (row, head); `allowed` lists the positions.
void attend_one(const uint16_t* q, const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                const std::vector<int32_t>& allowed, int64_t count, int64_t head_dim, float scale,
                std::vector<float>& scores, at::BFloat16* out) {
  const int64_t chunks = head_dim / kLanes;
  __m512 query[16];
  for (int64_t c = 0; c < chunks; ++c) query[c] = _mm512_mul_ps(bf16_to_fp32(q + c * kLanes), _mm512_set1_ps(scale));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    if (i + kPrefetchRows < count) {
      prefetch_row(k + allowed[i + kPrefetchRows] * k_stride, head_dim);
      prefetch_row(v + allowed[i + kPrefetchRows] * v_stride, head_dim);
    }
    const uint16_t* key = k + allowed[i] * k_stride;
    __m512 dot = _mm512_mul_ps(query[0], bf16_to_fp32(key));
    for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(query[c], bf16_to_fp32(key + c * kLanes), dot);
    scores[i] = _mm512_reduce_add_ps(dot);
    top = scores[i] > top ? scores[i] : top;
  }
  using Vec = at::vec::Vectorized<float>;
  Vec lane_sums(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) {
    Vec e = (Vec::loadu(scores.data() + i) - Vec(top)).exp_u20();
    e.store(scores.data() + i);
    lane_sums = lane_sums + e;
  }
  float lanes[Vec::size()];
  lane_sums.store(lanes);
  float total = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) total += lanes[l];
  for (; i < count; ++i) {
    scores[i] = std::exp(scores[i] - top);
    total += scores[i];
  }
  __m512 acc[16];
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    if (j + kPrefetchRows < count) prefetch_row(v + allowed[j + kPrefetchRows] * v_stride, head_dim);
    const uint16_t* value = v + allowed[j] * v_stride;
    __m512 weight = _mm512_set1_ps(scores[j]);
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, bf16_to_fp32(value + c * kLanes), acc[c]);
  }
  const float inverse = count > 0 ? 1.f / total : 0.f;  // a row with no allowed position gets zeros
  float result[kLanes];
  for (int64_t c = 0; c < chunks; ++c) {
    _mm512_storeu_ps(result, _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse)));
    for (int64_t l = 0; l < kLanes; ++l) out[c * kLanes + l] = at::BFloat16(result[l]);
  }
}

}  // namespace

// query [B, H, D]; key, value [B, H_kv, T, D] (any strides but a unit one on D); allowed [B, T] bool (unit stride
// on T). Returns [B, 1, H, D] bf16 (the layout the attention output is reshaped from).
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor allowed,
                               double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
              value.scalar_type() == at::kBFloat16 && allowed.scalar_type() == at::kBool, "dtypes");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.sizes() == key.sizes() && allowed.dim() == 2, "shapes");
  const int64_t batch = key.size(0), kv_heads = key.size(1), length = key.size(2), head_dim = key.size(3);
  const int64_t heads = query.size(1);
  TORCH_CHECK(query.size(0) == batch && query.size(2) == head_dim && heads % kv_heads == 0, "query shape");
  TORCH_CHECK(allowed.size(0) == batch && allowed.size(1) >= length && allowed.stride(1) == 1, "mask shape");
  TORCH_CHECK(head_dim % kLanes == 0 && head_dim <= 256 && key.stride(3) == 1 && value.stride(3) == 1, "head dim");
  query = query.contiguous();
  auto out = torch::empty({batch, 1, heads, head_dim}, query.options());
  const auto* q = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  const auto* k = reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>());
  const auto* v = reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>());
  const bool* mask = allowed.data_ptr<bool>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const int64_t group = heads / kv_heads;
  std::vector<float> scores(length);
  std::vector<int32_t> positions(length);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t count = 0;
    for (int64_t t = 0; t < length; ++t)
      if (mask[b * allowed.stride(0) + t]) positions[count++] = static_cast<int32_t>(t);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = h / group;
      attend_one(q + (b * heads + h) * head_dim, k + b * key.stride(0) + kv * key.stride(1), key.stride(2),
                 v + b * value.stride(0) + kv * value.stride(1), value.stride(2), positions, count, head_dim,
                 static_cast<float>(scale), scores, o + (b * heads + h) * head_dim);
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one-token bf16 attention over a KV cache (CPU, AVX-512)");
}
