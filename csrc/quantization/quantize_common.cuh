// Shared pieces of the quantize kernels. The rounding matches engine/ops.py's references bit for bit:
// scale = max(absmax / 127, 1e-8) and q = clamp(round_half_even(x / scale), -128, 127), with correctly
// rounded float32 divisions (explicit __fdiv_rn, so --use_fast_math cannot change them).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>

namespace smoothserve {

constexpr float kInt8Max = 127.0f;
constexpr float kMinScale = 1e-8f;
constexpr int kBlockThreads = 256;

__device__ __forceinline__ float scale_from_absmax(float absmax) {
  return fmaxf(__fdiv_rn(absmax, kInt8Max), kMinScale);
}

__device__ __forceinline__ int8_t quantize_value(float x, float scale) {
  const float rounded = rintf(__fdiv_rn(x, scale));  // rint: round half to even
  return static_cast<int8_t>(fminf(fmaxf(rounded, -128.0f), kInt8Max));
}

// Largest |value| of a non-negative float array, combined across blocks: for non-negative IEEE floats
// the integer order of the bit patterns is the numeric order.
__device__ __forceinline__ void atomic_max_nonnegative(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}

template <int Threads>
__device__ __forceinline__ float block_max(float value) {
  using Reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ float result;
  const float reduced = Reduce(storage).Reduce(value, [](float x, float y) { return fmaxf(x, y); });
  if (threadIdx.x == 0) result = reduced;
  __syncthreads();
  return result;
}

template <int Threads>
__device__ __forceinline__ float block_sum(float value) {
  using Reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ float result;
  const float reduced = Reduce(storage).Sum(value);
  if (threadIdx.x == 0) result = reduced;
  __syncthreads();
  return result;
}

}  // namespace smoothserve
