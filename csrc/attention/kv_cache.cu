// Store the new tokens' keys and values in the paged cache: cache[slot] = key[t] for slot = slots[t].
// A negative slot marks a padding row (a CUDA graph's batch rounded up) and writes nothing.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../cuda_utils.h"
#include "../ops.h"

namespace smoothserve {
namespace {

constexpr int kThreads = 128;

// One CTA per token; rows are moved as 16-byte vectors (`row_vecs` of them per token).
__global__ void write_kv_cache_kernel(const uint4* __restrict__ key, const uint4* __restrict__ value,
                                      int64_t key_stride_vecs, int64_t value_stride_vecs,
                                      uint4* __restrict__ key_cache, uint4* __restrict__ value_cache,
                                      const int64_t* __restrict__ slots, int row_vecs) {
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

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                    torch::Tensor& value_cache, const torch::Tensor& slots) {
  TORCH_CHECK(key.is_cuda() && key.dim() == 3 && key.sizes() == value.sizes(),
              "write_kv_cache: key and value must be CUDA [T, H, D] tensors of one shape");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
              "write_kv_cache: each key/value row must be contiguous [H, D]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes() && key_cache.size(2) == key.size(1) &&
                  key_cache.size(3) == key.size(2),
              "write_kv_cache: caches must be contiguous [blocks, block_size, H, D] matching the keys");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "write_kv_cache: keys, values and caches must share one dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 1 && slots.size(0) == key.size(0) &&
                  slots.is_contiguous() && slots.device() == key.device(),
              "write_kv_cache: slots must be a contiguous int64 [T] tensor on the keys' device");
  const int64_t element = key.element_size();
  const int64_t row_bytes = key.size(1) * key.size(2) * element;
  TORCH_CHECK(row_bytes % 16 == 0 && (key.stride(0) * element) % 16 == 0 && (value.stride(0) * element) % 16 == 0 &&
                  aligned16(key) && aligned16(value) && aligned16(key_cache) && aligned16(value_cache),
              "write_kv_cache: rows must be 16-byte aligned");
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const int64_t vec_elements = 16 / element;
  write_kv_cache_kernel<<<key.size(0), kThreads, 0, current_stream()>>>(
      reinterpret_cast<const uint4*>(key.data_ptr()), reinterpret_cast<const uint4*>(value.data_ptr()),
      key.stride(0) / vec_elements, value.stride(0) / vec_elements, reinterpret_cast<uint4*>(key_cache.data_ptr()),
      reinterpret_cast<uint4*>(value_cache.data_ptr()), slots.data_ptr<int64_t>(),
      static_cast<int>(row_bytes / 16));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace smoothserve
