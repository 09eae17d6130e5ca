// One pass of AdamW over fp32 master weights from bf16 gradients, writing the bf16 model weights as it goes
// (training/utils/optimizer_step.py), and the gradients' norms without fp32 copies. Per element it computes what torch's fused CPU AdamW (aten
// FusedAdamKernel.cpp, its AVX-512 build) computes from the gradient's fp32 copy, in the same order and with the
// same single roundings, so the master weights, moments and bf16 weights come out bit for bit the same; the
// Python side checks that on the running torch before it uses this kernel. Only whole vectors of 16 are updated
// here: the last numel % 16 elements of a tensor are left to torch itself, whose scalar tail rounds differently.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {


constexpr int64_t kVector = 16;  // fp32 lanes of an AVX-512 register, and ATen's unit of work (one cache line)

inline __m512 load_bf16(const at::BFloat16* source) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Round to nearest even, as c10::BFloat16's conversion from float does (a NaN becomes the quiet NaN 0x7FC0).
inline void store_bf16(at::BFloat16* target, __m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), rounded,
                                    _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(target), _mm512_cvtepi32_epi16(rounded));
}

struct Hyper {
  bool decays, small_lerp, scales;
  float decay, lerp, sq_weight, beta2, bias_correction2_sqrt, eps, neg_step_size, grad_multiplier;
};

// torch's per-tensor constants: computed in double from the (float) step count, then rounded to float.
Hyper hyper_for(double step, double lr, double beta1, double beta2, double weight_decay, double eps,
                double grad_multiplier, bool scales) {
  Hyper h;
  h.decays = weight_decay != 0.f;
  h.decay = float(1 - lr * weight_decay);
  h.lerp = float(1 - beta1);
  h.small_lerp = std::abs(h.lerp) < 0.5f;
  h.sq_weight = float(1 - beta2);
  h.beta2 = float(beta2);
  h.bias_correction2_sqrt = float(std::sqrt(1 - std::pow(beta2, step)));
  h.eps = float(eps);
  h.neg_step_size = float(-(lr / (1 - std::pow(beta1, step))));
  h.scales = scales;
  h.grad_multiplier = float(grad_multiplier);
  return h;
}

void update(float* param, float* exp_avg, float* exp_avg_sq, const at::BFloat16* grad, at::BFloat16* weight,
            int64_t begin, int64_t end, const Hyper& h) {
  const __m512 decay = _mm512_set1_ps(h.decay), beta2 = _mm512_set1_ps(h.beta2);
  const __m512 lerp = _mm512_set1_ps(h.small_lerp ? h.lerp : h.lerp - 1.0f);  // torch's exp_avg.lerp_ in one FMA
  const __m512 sq_weight = _mm512_set1_ps(h.sq_weight), eps = _mm512_set1_ps(h.eps);
  const __m512 bias_correction2_sqrt = _mm512_set1_ps(h.bias_correction2_sqrt);
  const __m512 neg_step_size = _mm512_set1_ps(h.neg_step_size), multiplier = _mm512_set1_ps(h.grad_multiplier);
  for (int64_t i = begin; i < end; i += kVector) {
    __m512 g = load_bf16(grad + i);
    if (h.scales) g = _mm512_mul_ps(g, multiplier);  // the clipping product, in fp32, before the step
    __m512 p = _mm512_loadu_ps(param + i);
    if (h.decays) p = _mm512_mul_ps(p, decay);
    __m512 m = _mm512_loadu_ps(exp_avg + i);
    m = _mm512_fmadd_ps(lerp, _mm512_sub_ps(g, m), h.small_lerp ? m : g);
    // v * beta2 + (1 - beta2) * g * g: torch's build contracts the second product into the sum
    const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(sq_weight, g), g,
                                     _mm512_mul_ps(_mm512_loadu_ps(exp_avg_sq + i), beta2));
    _mm512_storeu_ps(exp_avg + i, m);
    _mm512_storeu_ps(exp_avg_sq + i, v);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bias_correction2_sqrt), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step_size, m), denom));
    _mm512_storeu_ps(param + i, p);
    store_bf16(weight + i, p);
  }
}

}  // namespace

// Updates the first numel - numel % 16 elements of every tensor; steps[i] is tensor i's step count after this
// step's increment, grad_multiplier (when scales) the 1 / clip factor torch's step would see multiplied in.
void fused_adamw_bf16(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& weights,
                      const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                      const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<double>& steps, double lr,
                      double beta1, double beta2, double weight_decay, double eps, double grad_multiplier,
                      bool scales) {
  for (size_t t = 0; t < params.size(); t++) {
    const Hyper h = hyper_for(steps[t], lr, beta1, beta2, weight_decay, eps, grad_multiplier, scales);
    float* param = params[t].data_ptr<float>();
    float* exp_avg = exp_avgs[t].data_ptr<float>();
    float* exp_avg_sq = exp_avg_sqs[t].data_ptr<float>();
    const at::BFloat16* grad = grads[t].data_ptr<at::BFloat16>();
    at::BFloat16* weight = weights[t].data_ptr<at::BFloat16>();
    const int64_t units = params[t].numel() / kVector;
    at::parallel_for(0, units, 0, [&](int64_t first, int64_t last) {
      update(param, exp_avg, exp_avg_sq, grad, weight, first * kVector, last * kVector, h);
    });
  }
}

// The 2-norm of each bf16 gradient as torch takes it of the gradient's fp32 copy. ATen runs its norm kernel in
// the AVX2 build (AVX-512 is not registered for it): squares summed in order into one vector of 8 fp32 lanes, the
// lanes added left to right, the tail's squares after them, the root in fp32. Returns an [n] fp32 tensor of norms.
at::Tensor bf16_grad_norms(const std::vector<at::Tensor>& grads) {
  constexpr int64_t kLanes = 8;
  at::Tensor norms = at::empty({int64_t(grads.size())}, at::kFloat);
  float* out = norms.data_ptr<float>();
  for (size_t t = 0; t < grads.size(); t++) {
    const at::BFloat16* grad = grads[t].data_ptr<at::BFloat16>();
    const int64_t size = grads[t].numel(), vector_end = size - size % kLanes;
    if (size == 1) {  // torch reduces nothing there: the norm is the magnitude (also where its square underflows)
      out[t] = std::abs(static_cast<float>(grad[0]));
      continue;
    }
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < vector_end; i += kLanes) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(grad + i));
      const __m256 g = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
      sum = _mm256_add_ps(sum, _mm256_mul_ps(g, g));  // (not an FMA: a tiny square rounds before the sum)
    }
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, sum);
    float total = lanes[0];
    for (int64_t j = 1; j < kLanes; j++) total = total + lanes[j];
    for (int64_t i = vector_end; i < size; i++) {
      const float g = static_cast<float>(grad[i]);
      total = total + g * g;
    }
    out[t] = std::sqrt(total);
  }
  return norms;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("bf16_grad_norms", &bf16_grad_norms, "each bf16 gradient's 2-norm, as torch takes it of an fp32 copy");
  module.def("fused_adamw_bf16", &fused_adamw_bf16,
             "AdamW on fp32 master weights from bf16 gradients, writing the bf16 weights (whole vectors of 16)");
}
