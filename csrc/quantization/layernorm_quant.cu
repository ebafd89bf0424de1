// LayerNorm over the last dimension followed by int8 quantization, without writing the normalized
// activations to memory. Statistics are two-pass (mean, then variance) in float32, like PyTorch.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_utils.h"
#include "../ops.h"
#include "quantize_common.cuh"

namespace smoothserve {
namespace {

enum class Mode { kPerToken, kPerTensorDynamic, kPerTensorStatic };

struct RowStats {
  float mean;
  float rstd;
};

template <bool Vectorized, typename T>
__device__ __forceinline__ RowStats row_stats(const T* row, int64_t k, float eps) {
  float sum = 0.0f;
  for_each<Vectorized>(row, k, [&](int64_t, float v) { sum += v; });
  const float mean = block_sum<kBlockThreads>(sum) / static_cast<float>(k);
  float squares = 0.0f;
  for_each<Vectorized>(row, k, [&](int64_t, float v) { squares += (v - mean) * (v - mean); });
  const float variance = block_sum<kBlockThreads>(squares) / static_cast<float>(k);
  return {mean, rsqrtf(variance + eps)};
}

template <typename T>
__device__ __forceinline__ float normalized(float v, const T* weight, const T* bias, int64_t i, RowStats s) {
  float y = (v - s.mean) * s.rstd;
  if (weight != nullptr) y = y * static_cast<float>(weight[i]) + static_cast<float>(bias[i]);
  return y;
}

// Per token and static: one block per token. For per-tensor dynamic, pass 1 (Quantize = false) only
// reduces every token's absmax into `scale_io`, pass 2 quantizes with the derived scale.
template <typename T, Mode M, bool Quantize, bool Vectorized>
__global__ void layernorm_quant_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                       const T* __restrict__ bias, float eps, int64_t k, int8_t* __restrict__ q,
                                       float* __restrict__ scales, float* __restrict__ scale_io) {
  const T* row = x + blockIdx.x * k;
  const RowStats stats = row_stats<Vectorized>(row, k, eps);
  float scale;
  if constexpr (M == Mode::kPerTensorStatic) {
    scale = *scale_io;
  } else if constexpr (M == Mode::kPerTensorDynamic && Quantize) {
    scale = scale_from_absmax(*scale_io);
    if (blockIdx.x == 0 && threadIdx.x == 0) scales[0] = scale;
  } else {
    float absmax = 0.0f;
    for_each<Vectorized>(row, k, [&](int64_t i, float v) { absmax = fmaxf(absmax, fabsf(normalized(v, weight, bias, i, stats))); });
    absmax = block_max<kBlockThreads>(absmax);
    if constexpr (M == Mode::kPerTensorDynamic) {
      if (threadIdx.x == 0) atomic_max_nonnegative(scale_io, absmax);
      return;
    } else {
      scale = scale_from_absmax(absmax);
      if (threadIdx.x == 0) scales[blockIdx.x] = scale;
    }
  }
  quantize_row<Vectorized>(row, q + blockIdx.x * k, k, scale,
                           [&](int64_t i, float v) { return normalized(v, weight, bias, i, stats); });
}

// The same, with the row held in registers between passes (one read of x), for rows of up to
// kBlockThreads * MaxVecs 16-byte vectors: every OPT hidden size in fp16/bf16.
template <typename T, Mode M, bool Quantize, int MaxVecs>
__global__ void layernorm_quant_registers_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                 const T* __restrict__ bias, float eps, int64_t k,
                                                 int8_t* __restrict__ q, float* __restrict__ scales,
                                                 float* __restrict__ scale_io) {
  constexpr int N = Vec<T>::kSize;
  using Values = typename Vec<T>::Values;
  const auto* row = reinterpret_cast<const Values*>(x + blockIdx.x * k);
  const int64_t num_vecs = k / N;
  float y[MaxVecs][N];
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < MaxVecs; ++r) {
    const int64_t j = threadIdx.x + r * int64_t(blockDim.x);
    if (j < num_vecs) {
      const Values values = row[j];
#pragma unroll
      for (int e = 0; e < N; ++e) sum += (y[r][e] = static_cast<float>(values.v[e]));
    }
  }
  const float mean = block_sum<kBlockThreads>(sum) / static_cast<float>(k);
  float squares = 0.0f;
#pragma unroll
  for (int r = 0; r < MaxVecs; ++r) {
    if (threadIdx.x + r * int64_t(blockDim.x) < num_vecs) {
#pragma unroll
      for (int e = 0; e < N; ++e) squares += (y[r][e] - mean) * (y[r][e] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum<kBlockThreads>(squares) / static_cast<float>(k) + eps);
  float absmax = 0.0f;
#pragma unroll
  for (int r = 0; r < MaxVecs; ++r) {
    const int64_t j = threadIdx.x + r * int64_t(blockDim.x);
    if (j < num_vecs) {
      Values w, b;
      if (weight != nullptr) {
        w = reinterpret_cast<const Values*>(weight)[j];
        b = reinterpret_cast<const Values*>(bias)[j];
      }
#pragma unroll
      for (int e = 0; e < N; ++e) {
        float v = (y[r][e] - mean) * rstd;
        if (weight != nullptr) v = v * static_cast<float>(w.v[e]) + static_cast<float>(b.v[e]);
        y[r][e] = v;
        absmax = fmaxf(absmax, fabsf(v));
      }
    }
  }
  float scale;
  if constexpr (M == Mode::kPerTensorStatic) {
    scale = *scale_io;
  } else if constexpr (M == Mode::kPerTensorDynamic && Quantize) {
    scale = scale_from_absmax(*scale_io);
    if (blockIdx.x == 0 && threadIdx.x == 0) scales[0] = scale;
  } else {
    absmax = block_max<kBlockThreads>(absmax);
    if constexpr (M == Mode::kPerTensorDynamic) {
      if (threadIdx.x == 0) atomic_max_nonnegative(scale_io, absmax);
      return;
    } else {
      scale = scale_from_absmax(absmax);
      if (threadIdx.x == 0) scales[blockIdx.x] = scale;
    }
  }
  auto* out = reinterpret_cast<typename Vec<T>::Quantized*>(q + blockIdx.x * k);
#pragma unroll
  for (int r = 0; r < MaxVecs; ++r) {
    const int64_t j = threadIdx.x + r * int64_t(blockDim.x);
    if (j < num_vecs) {
      typename Vec<T>::Quantized packed;
#pragma unroll
      for (int e = 0; e < N; ++e) packed.v[e] = quantize_value(y[r][e], scale);
      out[j] = packed;
    }
  }
}

// Registers per thread grow with MaxVecs: launch the smallest variant that holds the row.
template <typename T, int MaxVecs>
void launch_registers(Mode kind, int64_t m, cudaStream_t stream, const T* x, const T* w, const T* b, float eps,
                      int64_t k, int8_t* q, float* scales, const torch::Tensor& like) {
  switch (kind) {
    case Mode::kPerToken:
      layernorm_quant_registers_kernel<T, Mode::kPerToken, true, MaxVecs>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, nullptr);
      return;
    case Mode::kPerTensorStatic:
      layernorm_quant_registers_kernel<T, Mode::kPerTensorStatic, true, MaxVecs>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, scales);
      return;
    case Mode::kPerTensorDynamic: {
      auto absmax = torch::zeros({1}, like.options().dtype(torch::kFloat));
      layernorm_quant_registers_kernel<T, Mode::kPerTensorDynamic, false, MaxVecs>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      layernorm_quant_registers_kernel<T, Mode::kPerTensorDynamic, true, MaxVecs>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      return;
    }
  }
}

template <typename T, bool Vectorized>
void launch_layernorm_quant(Mode kind, int64_t m, cudaStream_t stream, const T* x, const T* w, const T* b, float eps,
                            int64_t k, int8_t* q, float* scales, const torch::Tensor& like) {
  const int64_t vecs_per_thread = (k / Vec<T>::kSize + kBlockThreads - 1) / kBlockThreads;
  const bool in_registers = Vectorized && vecs_per_thread <= 8 &&
                            (w == nullptr || (rows_vectorizable(w, k) && rows_vectorizable(b, k)));
  if (in_registers) {
    if (vecs_per_thread <= 2) return launch_registers<T, 2>(kind, m, stream, x, w, b, eps, k, q, scales, like);
    if (vecs_per_thread <= 3) return launch_registers<T, 3>(kind, m, stream, x, w, b, eps, k, q, scales, like);
    if (vecs_per_thread <= 4) return launch_registers<T, 4>(kind, m, stream, x, w, b, eps, k, q, scales, like);
    if (vecs_per_thread <= 6) return launch_registers<T, 6>(kind, m, stream, x, w, b, eps, k, q, scales, like);
    return launch_registers<T, 8>(kind, m, stream, x, w, b, eps, k, q, scales, like);
  }
  switch (kind) {
    case Mode::kPerToken:
      layernorm_quant_kernel<T, Mode::kPerToken, true, Vectorized>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, nullptr);
      break;
    case Mode::kPerTensorStatic:
      layernorm_quant_kernel<T, Mode::kPerTensorStatic, true, Vectorized>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, scales);
      break;
    case Mode::kPerTensorDynamic: {
      auto absmax = torch::zeros({1}, like.options().dtype(torch::kFloat));
      layernorm_quant_kernel<T, Mode::kPerTensorDynamic, false, Vectorized>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      layernorm_quant_kernel<T, Mode::kPerTensorDynamic, true, Vectorized>
          <<<m, kBlockThreads, 0, stream>>>(x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      break;
    }
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> layernorm_quant(const torch::Tensor& x,
                                                         const std::optional<torch::Tensor>& weight,
                                                         const std::optional<torch::Tensor>& bias, double eps,
                                                         const std::string& mode,
                                                         const std::optional<torch::Tensor>& static_scale) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "layernorm_quant: x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(weight.has_value() == bias.has_value(), "layernorm_quant: weight and bias come together");
  const int64_t m = x.size(0), k = x.size(1);
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == k && bias->numel() == k && weight->is_contiguous() && bias->is_contiguous(),
                "layernorm_quant: weight and bias must be contiguous [K]");
    TORCH_CHECK(weight->scalar_type() == x.scalar_type() && bias->scalar_type() == x.scalar_type(),
                "layernorm_quant: weight and bias must have x's dtype");
  }
  Mode kind;
  if (mode == "per_token") {
    kind = Mode::kPerToken;
  } else if (mode == "per_tensor_dynamic") {
    kind = Mode::kPerTensorDynamic;
  } else if (mode == "per_tensor_static") {
    kind = Mode::kPerTensorStatic;
    TORCH_CHECK(static_scale.has_value() && static_scale->is_cuda() && static_scale->numel() == 1 &&
                    static_scale->scalar_type() == torch::kFloat,
                "layernorm_quant: static mode needs a float32 CUDA scale of one element");
  } else {
    TORCH_CHECK(false, "layernorm_quant: unknown mode ", mode);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  auto scales = kind == Mode::kPerToken ? torch::empty({m}, x.options().dtype(torch::kFloat))
                                        : torch::empty({1}, x.options().dtype(torch::kFloat));
  if (kind == Mode::kPerTensorStatic) scales.copy_(*static_scale);
  if (m == 0) return {q, scales};
  const cudaStream_t stream = current_stream();
  const float epsilon = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_quant", [&] {
    const scalar_t* w = weight.has_value() ? weight->data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* xs = x.data_ptr<scalar_t>();
    int8_t* qs = q.data_ptr<int8_t>();
    float* ss = scales.data_ptr<float>();
    if (rows_vectorizable(xs, k)) {
      launch_layernorm_quant<scalar_t, true>(kind, m, stream, xs, w, b, epsilon, k, qs, ss, x);
    } else {
      launch_layernorm_quant<scalar_t, false>(kind, m, stream, xs, w, b, epsilon, k, qs, ss, x);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales};
}

}  // namespace smoothserve
