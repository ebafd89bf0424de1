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

// Which rows need their absmax: per-token scales, and pass 1 of per-tensor dynamic quantization.
template <Mode M, bool Quantize>
constexpr bool kNeedsRowAbsmax = M == Mode::kPerToken || (M == Mode::kPerTensorDynamic && !Quantize);

// The scale this row is quantized with, from this thread's share of the row absmax where the mode needs
// it. Returns false in pass 1 of per-tensor dynamic quantization, which only feeds the global absmax.
template <Mode M, bool Quantize>
__device__ __forceinline__ bool row_scale(float absmax, float* __restrict__ scales, float* __restrict__ scale_io,
                                          float* scale) {
  if constexpr (M == Mode::kPerTensorStatic) {
    *scale = *scale_io;
  } else if constexpr (M == Mode::kPerTensorDynamic && Quantize) {
    *scale = scale_from_absmax(*scale_io);
    if (blockIdx.x == 0 && threadIdx.x == 0) scales[0] = *scale;
  } else {
    absmax = block_max<kBlockThreads>(absmax);
    if constexpr (M == Mode::kPerTensorDynamic) {
      if (threadIdx.x == 0) atomic_max_nonnegative(scale_io, absmax);
      return false;
    } else {
      *scale = scale_from_absmax(absmax);
      if (threadIdx.x == 0) scales[blockIdx.x] = *scale;
    }
  }
  return true;
}

// Per token and static: one block per token. For per-tensor dynamic, pass 1 (Quantize = false) only
// reduces every token's absmax into `scale_io`, pass 2 quantizes with the derived scale.
template <typename T, Mode M, bool Quantize, bool Vectorized>
__global__ void layernorm_quant_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                       const T* __restrict__ bias, float eps, int64_t k, int8_t* __restrict__ q,
                                       float* __restrict__ scales, float* __restrict__ scale_io) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const T* row = x + blockIdx.x * k;
  const RowStats stats = row_stats<Vectorized>(row, k, eps);
  float absmax = 0.0f;
  if constexpr (kNeedsRowAbsmax<M, Quantize>) {
    for_each<Vectorized>(row, k, [&](int64_t i, float v) { absmax = fmaxf(absmax, fabsf(normalized(v, weight, bias, i, stats))); });
  }
  float scale;
  if (!row_scale<M, Quantize>(absmax, scales, scale_io, &scale)) return;
  quantize_row<Vectorized>(row, q + blockIdx.x * k, k, scale,
                           [&](int64_t i, float v) { return normalized(v, weight, bias, i, stats); });
}

// The same, with the row held in registers between passes (one read of x), for rows of up to
// kBlockThreads * MaxVecs 16-byte vectors: every OPT hidden size in fp16/bf16. With Residual, the row
// is x + residual, rounded to T and also written to sum_out (the new residual stream).
template <typename T, Mode M, bool Quantize, int MaxVecs, bool Residual>
__global__ void layernorm_quant_registers_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                 const T* __restrict__ bias, float eps, int64_t k,
                                                 int8_t* __restrict__ q, float* __restrict__ scales,
                                                 float* __restrict__ scale_io, const T* __restrict__ residual,
                                                 T* __restrict__ sum_out) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
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
      Values values = row[j];
      if constexpr (Residual) {
        const Values added = reinterpret_cast<const Values*>(residual + blockIdx.x * k)[j];
#pragma unroll
        for (int e = 0; e < N; ++e)
          values.v[e] = static_cast<T>(static_cast<float>(values.v[e]) + static_cast<float>(added.v[e]));
        reinterpret_cast<Values*>(sum_out + blockIdx.x * k)[j] = values;
      }
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
  if (!row_scale<M, Quantize>(absmax, scales, scale_io, &scale)) return;
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
                      int64_t k, int8_t* q, float* scales, const torch::Tensor& like, const T* residual = nullptr,
                      T* sum_out = nullptr) {
  auto launch = [&](auto mode_tag, auto quantize_tag, auto residual_tag, const T* input, float* scale_io) {
    constexpr Mode Kind = decltype(mode_tag)::value;
    constexpr bool Quantize = decltype(quantize_tag)::value;
    constexpr bool Residual = decltype(residual_tag)::value;
    launch_kernel(layernorm_quant_registers_kernel<T, Kind, Quantize, MaxVecs, Residual>, m, kBlockThreads, 0,
                  stream, input, w, b, eps, k, q, scales, scale_io, residual, sum_out);
  };
  using PerToken = std::integral_constant<Mode, Mode::kPerToken>;
  using Static = std::integral_constant<Mode, Mode::kPerTensorStatic>;
  using Dynamic = std::integral_constant<Mode, Mode::kPerTensorDynamic>;
  using Yes = std::true_type;
  using No = std::false_type;
  const bool add = residual != nullptr;
  switch (kind) {
    case Mode::kPerToken:
      return add ? launch(PerToken{}, Yes{}, Yes{}, x, nullptr) : launch(PerToken{}, Yes{}, No{}, x, nullptr);
    case Mode::kPerTensorStatic:
      return add ? launch(Static{}, Yes{}, Yes{}, x, scales) : launch(Static{}, Yes{}, No{}, x, scales);
    case Mode::kPerTensorDynamic: {
      // Pass 1 reduces the absmax (and writes the sum); pass 2 normalizes the (summed) row again.
      auto absmax = torch::zeros({1}, like.options().dtype(torch::kFloat));
      float* absmax_ptr = absmax.data_ptr<float>();
      if (add) {
        launch(Dynamic{}, No{}, Yes{}, x, absmax_ptr);
        launch(Dynamic{}, Yes{}, No{}, sum_out, absmax_ptr);
      } else {
        launch(Dynamic{}, No{}, No{}, x, absmax_ptr);
        launch(Dynamic{}, Yes{}, No{}, x, absmax_ptr);
      }
      return;
    }
  }
}

// Whether a row fits the register variant, and how many vectors per thread it needs (0: it does not fit).
template <typename T>
int register_vecs(const T* x, const T* w, const T* b, int64_t k) {
  if (!rows_vectorizable(x, k) || (w != nullptr && !(rows_vectorizable(w, k) && rows_vectorizable(b, k)))) return 0;
  const int64_t per_thread = (k / Vec<T>::kSize + kBlockThreads - 1) / kBlockThreads;
  if (per_thread > 8) return 0;
  return per_thread <= 2 ? 2 : per_thread <= 3 ? 3 : per_thread <= 4 ? 4 : per_thread <= 6 ? 6 : 8;
}

template <typename T>
void launch_registers_sized(int vecs, Mode kind, int64_t m, cudaStream_t stream, const T* x, const T* w, const T* b,
                            float eps, int64_t k, int8_t* q, float* scales, const torch::Tensor& like,
                            const T* residual = nullptr, T* sum_out = nullptr) {
  switch (vecs) {
    case 2: return launch_registers<T, 2>(kind, m, stream, x, w, b, eps, k, q, scales, like, residual, sum_out);
    case 3: return launch_registers<T, 3>(kind, m, stream, x, w, b, eps, k, q, scales, like, residual, sum_out);
    case 4: return launch_registers<T, 4>(kind, m, stream, x, w, b, eps, k, q, scales, like, residual, sum_out);
    case 6: return launch_registers<T, 6>(kind, m, stream, x, w, b, eps, k, q, scales, like, residual, sum_out);
    default: return launch_registers<T, 8>(kind, m, stream, x, w, b, eps, k, q, scales, like, residual, sum_out);
  }
}

template <typename T, bool Vectorized>
void launch_layernorm_quant(Mode kind, int64_t m, cudaStream_t stream, const T* x, const T* w, const T* b, float eps,
                            int64_t k, int8_t* q, float* scales, const torch::Tensor& like) {
  if (const int vecs = register_vecs(x, w, b, k); Vectorized && vecs > 0) {
    return launch_registers_sized(vecs, kind, m, stream, x, w, b, eps, k, q, scales, like);
  }
  switch (kind) {
    case Mode::kPerToken:
      launch_kernel(layernorm_quant_kernel<T, Mode::kPerToken, true, Vectorized>, m, kBlockThreads, 0, stream, x, w,
                    b, eps, k, q, scales, nullptr);
      break;
    case Mode::kPerTensorStatic:
      launch_kernel(layernorm_quant_kernel<T, Mode::kPerTensorStatic, true, Vectorized>, m, kBlockThreads, 0,
                    stream, x, w, b, eps, k, q, scales, scales);
      break;
    case Mode::kPerTensorDynamic: {
      auto absmax = torch::zeros({1}, like.options().dtype(torch::kFloat));
      launch_kernel(layernorm_quant_kernel<T, Mode::kPerTensorDynamic, false, Vectorized>, m, kBlockThreads, 0,
                    stream, x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      launch_kernel(layernorm_quant_kernel<T, Mode::kPerTensorDynamic, true, Vectorized>, m, kBlockThreads, 0,
                    stream, x, w, b, eps, k, q, scales, absmax.data_ptr<float>());
      break;
    }
  }
}

}  // namespace

namespace {

Mode parse_mode(const std::string& mode, const std::optional<torch::Tensor>& static_scale, const char* op) {
  if (mode == "per_token") return Mode::kPerToken;
  if (mode == "per_tensor_dynamic") return Mode::kPerTensorDynamic;
  TORCH_CHECK(mode == "per_tensor_static", op, ": unknown mode ", mode);
  TORCH_CHECK(static_scale.has_value() && static_scale->is_cuda() && static_scale->numel() == 1 &&
                  static_scale->scalar_type() == torch::kFloat,
              op, ": static mode needs a float32 CUDA scale of one element");
  return Mode::kPerTensorStatic;
}

void check_norm_inputs(const torch::Tensor& x, const std::optional<torch::Tensor>& weight,
                       const std::optional<torch::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(weight.has_value() == bias.has_value(), op, ": weight and bias come together");
  if (weight.has_value()) {
    const int64_t k = x.size(1);
    TORCH_CHECK(weight->numel() == k && bias->numel() == k && weight->is_contiguous() && bias->is_contiguous(), op,
                ": weight and bias must be contiguous [K]");
    TORCH_CHECK(weight->scalar_type() == x.scalar_type() && bias->scalar_type() == x.scalar_type(), op,
                ": weight and bias must have x's dtype");
  }
}

// Static mode hands back the calibrated scale itself, which the kernels only read: a copy would cost a
// kernel launch per LayerNorm, a tenth of a millisecond per decode step of OPT-30B.
torch::Tensor scales_for(Mode kind, const torch::Tensor& x, const std::optional<torch::Tensor>& static_scale) {
  if (kind == Mode::kPerTensorStatic) {
    TORCH_CHECK(static_scale->device() == x.device(), "layernorm_quant: the static scale must be on x's device");
    return static_scale->reshape({1});
  }
  return torch::empty({kind == Mode::kPerToken ? x.size(0) : 1}, x.options().dtype(torch::kFloat));
}

template <typename T>
const T* optional_ptr(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> layernorm_quant(const torch::Tensor& x,
                                                         const std::optional<torch::Tensor>& weight,
                                                         const std::optional<torch::Tensor>& bias, double eps,
                                                         const std::string& mode,
                                                         const std::optional<torch::Tensor>& static_scale) {
  check_norm_inputs(x, weight, bias, "layernorm_quant");
  const Mode kind = parse_mode(mode, static_scale, "layernorm_quant");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  auto scales = scales_for(kind, x, static_scale);
  if (m == 0) return {q, scales};
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_quant", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* w = optional_ptr<scalar_t>(weight);
    const scalar_t* b = optional_ptr<scalar_t>(bias);
    auto launch = rows_vectorizable(xs, k) ? launch_layernorm_quant<scalar_t, true>
                                           : launch_layernorm_quant<scalar_t, false>;
    launch(kind, m, stream, xs, w, b, static_cast<float>(eps), k, q.data_ptr<int8_t>(), scales.data_ptr<float>(), x);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> add_layernorm_quant(
    const torch::Tensor& x, const torch::Tensor& residual, const std::optional<torch::Tensor>& weight,
    const std::optional<torch::Tensor>& bias, double eps, const std::string& mode,
    const std::optional<torch::Tensor>& static_scale) {
  check_norm_inputs(x, weight, bias, "add_layernorm_quant");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() && residual.is_contiguous() &&
                  residual.device() == x.device(),
              "add_layernorm_quant: residual must be a contiguous tensor like x");
  const Mode kind = parse_mode(mode, static_scale, "add_layernorm_quant");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layernorm_quant", [&] {
    fused = register_vecs(x.data_ptr<scalar_t>(), optional_ptr<scalar_t>(weight), optional_ptr<scalar_t>(bias), k) > 0 &&
            rows_vectorizable(residual.data_ptr<scalar_t>(), k);
  });
  if (!fused || m == 0) {  // rows too long or unaligned for one pass: add, then normalize and quantize
    auto summed = x + residual;
    auto [q, scales] = layernorm_quant(summed, weight, bias, eps, mode, static_scale);
    return {q, scales, summed};
  }
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  auto scales = scales_for(kind, x, static_scale);
  auto summed = torch::empty_like(x);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layernorm_quant", [&] {
    const scalar_t* w = optional_ptr<scalar_t>(weight);
    const scalar_t* b = optional_ptr<scalar_t>(bias);
    const scalar_t* xs = x.data_ptr<scalar_t>();
    launch_registers_sized(register_vecs(xs, w, b, k), kind, m, stream, xs, w, b, static_cast<float>(eps), k,
                           q.data_ptr<int8_t>(), scales.data_ptr<float>(), x, residual.data_ptr<scalar_t>(),
                           summed.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales, summed};
}

}  // namespace smoothserve
