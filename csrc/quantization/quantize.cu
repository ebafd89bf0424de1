// Dynamic per-token, dynamic per-tensor and static int8 quantization of activations [M, K].
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_utils.h"
#include "../ops.h"
#include "quantize_common.cuh"

namespace smoothserve {
namespace {

// One block per token: absmax, then quantize (the second read hits L1/L2).
template <typename T, bool Vectorized>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                          float* __restrict__ scales, int64_t k) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const T* row = x + blockIdx.x * k;
  float absmax = 0.0f;
  for_each<Vectorized>(row, k, [&](int64_t, float v) { absmax = fmaxf(absmax, fabsf(v)); });
  const float scale = scale_from_absmax(block_max<kBlockThreads>(absmax));
  quantize_row<Vectorized>(row, q + blockIdx.x * k, k, scale, [](int64_t, float v) { return v; });
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

template <typename T>
__global__ void absmax_kernel(const T* __restrict__ x, float* __restrict__ absmax, int64_t numel) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  float local = 0.0f;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x)
    local = fmaxf(local, fabsf(static_cast<float>(x[i])));
  const float reduced = block_max<kBlockThreads>(local);
  if (threadIdx.x == 0) atomic_max_nonnegative(absmax, reduced);
}

// scale_or_absmax holds the scale (static) or the absmax (dynamic: the scale is derived and stored).
template <typename T, bool FromAbsmax>
__global__ void quantize_tensor_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                       const float* __restrict__ scale_or_absmax, float* __restrict__ scale_out,
                                       int64_t numel) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const float scale = FromAbsmax ? scale_from_absmax(*scale_or_absmax) : *scale_or_absmax;
  if (FromAbsmax && blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x)
    q[i] = quantize_value(static_cast<float>(x[i]), scale);
}

void check_activation(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous CUDA [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16 ||
                  x.scalar_type() == torch::kFloat,
              op, ": x must be float16, bfloat16 or float32");
}

int grid_for(int64_t numel) {
  const int sms = sm_count();
  const int64_t blocks = (numel + kBlockThreads - 1) / kBlockThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 8)));
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> quantize_per_token(const torch::Tensor& x) {
  check_activation(x, "quantize_per_token");
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  auto scales = torch::empty({x.size(0)}, x.options().dtype(torch::kFloat));
  if (x.numel() == 0) return {q, scales};
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_per_token", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    auto kernel = rows_vectorizable(xs, x.size(1)) ? quantize_per_token_kernel<scalar_t, true>
                                                   : quantize_per_token_kernel<scalar_t, false>;
    launch_kernel(kernel, x.size(0), kBlockThreads, 0, stream, xs, q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                  x.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales};
}

std::tuple<torch::Tensor, torch::Tensor> quantize_per_tensor(const torch::Tensor& x) {
  check_activation(x, "quantize_per_tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  auto absmax = torch::zeros({1}, x.options().dtype(torch::kFloat));
  auto scale = torch::empty({1}, x.options().dtype(torch::kFloat));
  const int64_t numel = x.numel();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_per_tensor", [&] {
    launch_kernel(absmax_kernel<scalar_t>, grid_for(numel), kBlockThreads, 0, stream, x.data_ptr<scalar_t>(),
                  absmax.data_ptr<float>(), numel);
    launch_kernel(quantize_tensor_kernel<scalar_t, true>, grid_for(numel), kBlockThreads, 0, stream,
        x.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), absmax.data_ptr<float>(), scale.data_ptr<float>(), numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

torch::Tensor quantize_static(const torch::Tensor& x, const torch::Tensor& scale) {
  check_activation(x, "quantize_static");
  TORCH_CHECK(scale.is_cuda() && scale.numel() == 1 && scale.scalar_type() == torch::kFloat,
              "quantize_static: scale must be a float32 CUDA tensor of one element");
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = torch::empty_like(x, x.options().dtype(torch::kInt8));
  const int64_t numel = x.numel();
  if (numel == 0) return q;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_static", [&] {
    launch_kernel(quantize_tensor_kernel<scalar_t, false>, grid_for(numel), kBlockThreads, 0, stream,
        x.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr, numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

}  // namespace smoothserve
