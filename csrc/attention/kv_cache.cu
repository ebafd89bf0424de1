// Store the new tokens' keys and values in the paged cache: cache[slot] = key[t] for slot = slots[t].
// A negative slot marks a padding row (a CUDA graph's batch rounded up) and writes nothing.
// An int8 cache stores each (token, head) row quantized symmetrically with its own scale (absmax / 127),
// rounded exactly as quantize_per_token rounds a row (engine/ops.py's reference is that function).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../cuda_utils.h"
#include "../ops.h"
#include "../quantization/quantize_common.cuh"
#include "kv_cache_checks.h"

namespace smoothserve {
namespace {

constexpr int kThreads = 128;

// One CTA per token; rows are moved as 16-byte vectors (`row_vecs` of them per token).
__global__ void write_kv_cache_kernel(const uint4* __restrict__ key, const uint4* __restrict__ value,
                                      int64_t key_stride_vecs, int64_t value_stride_vecs,
                                      uint4* __restrict__ key_cache, uint4* __restrict__ value_cache,
                                      const int64_t* __restrict__ slots, int row_vecs) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const int64_t slot = slots[blockIdx.x];
  if (slot < 0) return;
  const uint4* k = key + blockIdx.x * key_stride_vecs;
  const uint4* v = value + blockIdx.x * value_stride_vecs;
  uint4* k_out = key_cache + slot * row_vecs;
  uint4* v_out = value_cache + slot * row_vecs;
  for (int i = threadIdx.x; i < row_vecs; i += kThreads) {
    k_out[i] = k[i];
    v_out[i] = v[i];
  }
}

constexpr int kHeadsPerCta = kThreads / 32;  // one warp quantizes one (token, head) row

template <typename T>
__device__ __forceinline__ void quantize_head_row(const T* __restrict__ in, int8_t* __restrict__ out,
                                                  float* __restrict__ scale_out, int head_dim, int lane) {
  float absmax = 0.0f;
  for (int d = lane; d < head_dim; d += 32) absmax = fmaxf(absmax, fabsf(static_cast<float>(in[d])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffff, absmax, offset));
  const float scale = scale_from_absmax(absmax);
  for (int d = lane; d < head_dim; d += 32) out[d] = quantize_value(static_cast<float>(in[d]), scale);
  if (lane == 0) *scale_out = scale;
}

// Grid (tokens, ceil(heads / kHeadsPerCta)).
template <typename T>
__global__ void write_kv_cache_int8_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                           int64_t key_stride, int64_t value_stride, int8_t* __restrict__ key_cache,
                                           int8_t* __restrict__ value_cache, float* __restrict__ key_scales,
                                           float* __restrict__ value_scales, const int64_t* __restrict__ slots,
                                           int num_heads, int head_dim) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const int64_t slot = slots[blockIdx.x];
  const int head = blockIdx.y * kHeadsPerCta + threadIdx.x / 32;
  if (slot < 0 || head >= num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t row = slot * num_heads + head;
  quantize_head_row(key + blockIdx.x * key_stride + head * head_dim, key_cache + row * head_dim, key_scales + row,
                    head_dim, lane);
  quantize_head_row(value + blockIdx.x * value_stride + head * head_dim, value_cache + row * head_dim,
                    value_scales + row, head_dim, lane);
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                    torch::Tensor& value_cache, const torch::Tensor& slots) {
  check_kv_write("write_kv_cache", key, value, key_cache, value_cache, slots);
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "write_kv_cache: keys, values and caches must share one dtype");
  const int64_t element = key.element_size();
  const int64_t row_bytes = key.size(1) * key.size(2) * element;
  TORCH_CHECK(row_bytes % 16 == 0 && (key.stride(0) * element) % 16 == 0 && (value.stride(0) * element) % 16 == 0 &&
                  aligned16(key) && aligned16(value) && aligned16(key_cache) && aligned16(value_cache),
              "write_kv_cache: rows must be 16-byte aligned");
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const int64_t vec_elements = 16 / element;
  launch_kernel(write_kv_cache_kernel, key.size(0), kThreads, 0, current_stream(),
      reinterpret_cast<const uint4*>(key.data_ptr()), reinterpret_cast<const uint4*>(value.data_ptr()),
      key.stride(0) / vec_elements, value.stride(0) / vec_elements, reinterpret_cast<uint4*>(key_cache.data_ptr()),
      reinterpret_cast<uint4*>(value_cache.data_ptr()), slots.data_ptr<int64_t>(),
      static_cast<int>(row_bytes / 16));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_kv_cache_int8(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                         torch::Tensor& value_cache, torch::Tensor& key_scales, torch::Tensor& value_scales,
                         const torch::Tensor& slots) {
  check_kv_write("write_kv_cache_int8", key, value, key_cache, value_cache, slots);
  TORCH_CHECK(key.scalar_type() == value.scalar_type() && key_cache.scalar_type() == torch::kChar &&
                  value_cache.scalar_type() == torch::kChar,
              "write_kv_cache_int8: key and value must share one dtype, and the caches must be int8");
  check_kv_scales("write_kv_cache_int8", key_scales, key_cache);
  check_kv_scales("write_kv_cache_int8", value_scales, value_cache);
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const int num_heads = key.size(1), head_dim = key.size(2);
  const dim3 grid(key.size(0), (num_heads + kHeadsPerCta - 1) / kHeadsPerCta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "write_kv_cache_int8", [&] {
    launch_kernel(write_kv_cache_int8_kernel<scalar_t>, grid, kThreads, 0, current_stream(),
        key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), key.stride(0), value.stride(0),
        key_cache.data_ptr<int8_t>(), value_cache.data_ptr<int8_t>(), key_scales.data_ptr<float>(),
        value_scales.data_ptr<float>(), slots.data_ptr<int64_t>(), num_heads, head_dim);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace smoothserve
