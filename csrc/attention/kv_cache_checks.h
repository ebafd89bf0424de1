// Argument checks shared by the ops that read or write the paged KV cache.
#pragma once

#include <torch/all.h>

namespace smoothserve {

// An int8 cache's scales: contiguous float32 [blocks, block_size, H], one per cache row, on its device.
inline void check_kv_scales(const char* op, const torch::Tensor& scales, const torch::Tensor& cache) {
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == cache.size(0) && scales.size(1) == cache.size(1) &&
                  scales.size(2) == cache.size(2) && scales.device() == cache.device(),
              op, ": scales must be contiguous float32 [blocks, block_size, H] on the cache's device");
}

// New keys/values [T, H, D] with contiguous rows, caches [blocks, block_size, H, D] matching them, slots [T].
inline void check_kv_write(const char* op, const torch::Tensor& key, const torch::Tensor& value,
                           const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                           const torch::Tensor& slots) {
  TORCH_CHECK(key.is_cuda() && key.dim() == 3 && key.sizes() == value.sizes(), op,
              ": key and value must be CUDA [T, H, D] tensors of one shape");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
              op, ": each key/value row must be contiguous [H, D]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes() && key_cache.size(2) == key.size(1) &&
                  key_cache.size(3) == key.size(2) && key_cache.device() == key.device() &&
                  value_cache.device() == key.device(),
              op, ": caches must be contiguous [blocks, block_size, H, D] matching the keys, on their device");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 1 && slots.size(0) == key.size(0) &&
                  slots.is_contiguous() && slots.device() == key.device(),
              op, ": slots must be a contiguous int64 [T] tensor on the keys' device");
}

}  // namespace smoothserve
