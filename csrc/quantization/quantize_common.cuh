// Shared pieces of the quantize kernels. The rounding matches engine/ops.py's references bit for bit:
// scale = max(absmax * (1/127), 1e-8) and q = clamp(round_half_even(x / scale), -128, 127), with a
// correctly rounded float32 division (explicit __fdiv_rn, so --use_fast_math cannot change it).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>

namespace smoothserve {

constexpr float kInt8Max = 127.0f;
constexpr float kInvInt8Max = 1.0f / 127.0f;
constexpr float kMinScale = 1e-8f;
constexpr int kBlockThreads = 256;

__device__ __forceinline__ float scale_from_absmax(float absmax) {
  return fmaxf(__fmul_rn(absmax, kInvInt8Max), kMinScale);
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

// 16-byte vectors of activations, and the int8 vectors they quantize to.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  struct alignas(16) Values {
    T v[kSize];
  };
  struct alignas(kSize) Quantized {
    int8_t v[kSize];
  };
};

// Calls f(index, value) for every element of a row, with 16-byte loads where the row allows them.
template <bool Vectorized, typename T, typename F>
__device__ __forceinline__ void for_each(const T* __restrict__ row, int64_t k, F&& f) {
  if constexpr (Vectorized) {
    constexpr int N = Vec<T>::kSize;
    const auto* vectors = reinterpret_cast<const typename Vec<T>::Values*>(row);
    // Unrolled so that each thread has several 16-byte loads in flight: with one row per block and few
    // rows (decode), a loop that waits on each load in turn ran at a fraction of the bandwidth.
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < k / N; j += blockDim.x) {
      const typename Vec<T>::Values values = vectors[j];
#pragma unroll
      for (int e = 0; e < N; ++e) f(j * N + e, static_cast<float>(values.v[e]));
    }
  } else {
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) f(i, static_cast<float>(row[i]));
  }
}

// Writes q[i] = quantize(g(i, x[i])) for a row, with matching vector stores.
template <bool Vectorized, typename T, typename G>
__device__ __forceinline__ void quantize_row(const T* __restrict__ row, int8_t* __restrict__ out, int64_t k,
                                             float scale, G&& g) {
  if constexpr (Vectorized) {
    constexpr int N = Vec<T>::kSize;
    const auto* vectors = reinterpret_cast<const typename Vec<T>::Values*>(row);
    auto* outputs = reinterpret_cast<typename Vec<T>::Quantized*>(out);
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < k / N; j += blockDim.x) {
      const typename Vec<T>::Values values = vectors[j];
      typename Vec<T>::Quantized q;
#pragma unroll
      for (int e = 0; e < N; ++e) q.v[e] = quantize_value(g(j * N + e, static_cast<float>(values.v[e])), scale);
      outputs[j] = q;
    }
  } else {
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) out[i] = quantize_value(g(i, static_cast<float>(row[i])), scale);
  }
}

// Rows can use 16-byte vectors when every row starts 16-byte aligned.
template <typename T>
inline bool rows_vectorizable(const T* base, int64_t k) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && k % Vec<T>::kSize == 0;
}

}  // namespace smoothserve
