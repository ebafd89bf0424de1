// The Hopper W8A8 GEMM's interface, without CUTLASS's heavy headers (for the dispatcher).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/cutlass.h>

#include "w8a8_gemm_problem.h"

namespace smoothserve::sm90 {

// Tile configurations, chosen by the number of tokens M:
//   kSwapM16  M <= 16   swapped, 128x16x256 tile, stream-K: the weight stream dominates, and
//                       splitting K keeps every SM streaming even when N gives few tiles
//   kSwapM64  M <= 64   swapped, 128x64x128, stream-K
//   kM256     M <= 256  128x128x128, 1x2 cluster, stream-K
//   kLarge    M > 256   128x256x128 cooperative, 2x1 cluster, stream-K (its heuristic runs whole
//                       tiles data-parallel and splits only the last, partial wave)
enum class GemmConfig { kSwapM16, kSwapM64, kM256, kLarge };

// ElementOut: cutlass::half_t or cutlass::bfloat16_t with ElementBias = ElementOut, or int8_t (the
// requantized output; ElementBias half_t or bfloat16_t). The int8 output is instantiated for kSwapM16,
// kSwapM64 and kLarge (serving 64 < M <= 256 too) only, to bound compile time.
template <GemmConfig C, typename ElementOut, typename ElementBias = ElementOut>
size_t workspace_size(const GemmProblem& p);

template <GemmConfig C, typename ElementOut, typename ElementBias = ElementOut>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace smoothserve::sm90
