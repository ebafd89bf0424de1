// The Hopper W8A8 GEMM's interface, without CUTLASS's heavy headers (for the dispatcher).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/cutlass.h>

namespace smoothserve::sm90 {

struct GemmProblem {
  const int8_t* a;       // [M, K] row-major
  const int8_t* w;       // [N, K] row-major (K-major)
  const float* a_scale;  // [M] or [1]
  const float* w_scale;  // [N] or [1]
  const void* bias;      // [N] in the output dtype, or nullptr
  void* out;             // [M, N] row-major
  int m, n, k;
  bool a_scale_per_token;
  bool w_scale_per_channel;
  bool relu;
};

// Tile configurations, chosen by the number of tokens M:
//   kSwapM16  M <= 16   swapped, 128x16x256 tile, stream-K: the weight stream dominates, and
//                       splitting K keeps every SM streaming even when N gives few tiles
//   kSwapM64  M <= 64   swapped, 128x64x128, stream-K
//   kM256     M <= 256  128x128x128, 1x2 cluster, stream-K
//   kLarge    M > 256   128x256x128 cooperative, 2x1 cluster, stream-K (its heuristic runs whole
//                       tiles data-parallel and splits only the last, partial wave)
enum class GemmConfig { kSwapM16, kSwapM64, kM256, kLarge };

template <GemmConfig C, typename ElementOut>
size_t workspace_size(const GemmProblem& p);

template <GemmConfig C, typename ElementOut>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace smoothserve::sm90
