// One W8A8 GEMM call, as every kernel family (sm80, sm90) receives it. Plain pointers and flags: no
// CUTLASS or torch types, so the dispatcher and each kernel's translation unit agree on it cheaply.
//
//   y[m, n] = max(a_scale[m|0] * (w_scale[n|0] * acc[m, n]) + bias[n], floor)   (one fma, then max)
//   out     = y in fp16/bf16, or clamp(rint(y / out_scale), -128, 127) in int8
//
// floor is 0 for a fused ReLU and -inf otherwise.
#pragma once

#include <cstdint>

namespace smoothserve {

struct GemmProblem {
  const int8_t* a;          // [M, K] row-major
  const int8_t* w;          // [N, K] row-major (K-major)
  const float* a_scale;     // [M] or [1]
  const float* w_scale;     // [N] or [1]
  const void* bias;         // [N] in the bias dtype (the output dtype, or fp16/bf16 for int8 out), or nullptr
  const float* out_scale;   // [1]: the requantization scale of an int8 output; nullptr otherwise
  void* out;                // [M, N] row-major
  int m, n, k;
  bool a_scale_per_token;
  bool w_scale_per_channel;
  bool relu;
  // sm80 kernels only: let CUTLASS 2.x stream-K split K across CTAs. Off (the default), the same kernel
  // runs whole tiles data-parallel; see w8a8_gemm_sm80.cuh for why. The dispatcher sets it from
  // SMOOTHSERVE_SM80_STREAMK.
  bool stream_k = false;
  // sm90 stream-K configurations only: 1 lets CUTLASS's heuristic choose data-parallel or stream-K;
  // s > 1 forces split-K, every output tile's K cut into s equal slices. The dispatcher chooses it
  // (w8a8_gemm.cu); the data-parallel sm90 configurations ignore it.
  int splits = 1;
  // The device's SM count, which CUTLASS 3 would otherwise ask the driver for several times per call.
  int sm_count = 0;
  int device = 0;
};

}  // namespace smoothserve
