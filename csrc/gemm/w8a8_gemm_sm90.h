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

// Tile configurations; the dispatcher (sm90_schedule in w8a8_gemm.cu) picks one by M and by how many
// output tiles the problem has per SM, and says why:
//   kSwapM16        M <= 16   swapped, 128x16x256, cooperative, stream-K scheduler
//   kSwapM64        M <= 64   swapped, 128x64x128, cooperative, stream-K scheduler
//   kSwapM16Narrow  M <= 16   swapped, 64x16x256, one CTA per tile (no workspace), for N <= 64 x SMs
//   kSwapM64Narrow  M <= 64   swapped, 64x64x256, 2x1 cluster, one CTA per tile, for N <= 64 x SMs
//   kM256           M <= 256  128x128x128, 1x2 cluster, cooperative, stream-K scheduler
//   kLarge          M > 256   128x256x128, 2x1 cluster, cooperative, stream-K scheduler
// "Swapped" computes out^T = W A^T so that the weights fill the MMA's M side (w8a8_gemm_sm90.cuh). The
// stream-K scheduler's configurations take GemmProblem::splits: 1 for CUTLASS's heuristic (whole tiles
// data-parallel, stream-K for a partial last wave), 2 for split-K.
enum class GemmConfig { kSwapM16, kSwapM64, kSwapM16Narrow, kSwapM64Narrow, kM256, kLarge };

// ElementOut: cutlass::half_t or cutlass::bfloat16_t with ElementBias = ElementOut, or int8_t (the
// requantized output; ElementBias half_t or bfloat16_t). The int8 output is instantiated for kSwapM16,
// kSwapM64 and kLarge (serving 64 < M <= 256 too) only, to bound compile time: it serves fc1 (N = 4h),
// whose many output tiles already fill the GPU.
template <GemmConfig C, typename ElementOut, typename ElementBias = ElementOut>
size_t workspace_size(const GemmProblem& p);

template <GemmConfig C, typename ElementOut, typename ElementBias = ElementOut>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace smoothserve::sm90
