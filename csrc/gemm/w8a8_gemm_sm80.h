// The Ampere-class (sm80) W8A8 GEMM's interface, without CUTLASS's heavy headers (for the dispatcher).
//
// CUTLASS 2.x: int8 mma.sync.m16n8k32 tensor cores, a multistage cp.async mainloop, data-parallel
// (opt-in stream-K) tile scheduling and an epilogue visitor tree (EVT) with the same semantics as the
// sm90 kernel (w8a8_gemm_problem.h). It runs on sm_80/86/87/89, and on Hopper through its sm_90a SASS
// (SMOOTHSERVE_GEMM_ARCH=sm80, for testing), where mma.sync still exists.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/half.h>

#include "w8a8_gemm_problem.h"

namespace smoothserve::sm80 {

// Tile configurations (threadblock M x N x K, warp tile, pipeline stages), chosen by the number of
// tokens M. All are built on CUTLASS's stream-K kernel; it runs whole tiles data-parallel unless
// GemmProblem::stream_k (SMOOTHSERVE_SM80_STREAMK=1) lets it split K across CTAs when the output has
// too few tiles to fill the GPU (decode):
//   kM32    M <= 32    32x128x128, warps 32x32x128 (4), 4 stages, 80 KiB smem: decode is bound by the
//                      weight stream; a short M tile wastes little, long K stages keep bytes in flight
//   kM128   M <= 128   64x128x128, warps 32x64x128 (4), 3 stages, 72 KiB
//   kLarge  M > 128    128x256x64, warps 64x64x64 (8), 3 stages, 72 KiB (CUTLASS's large int8 tile)
// Shared memory stays under 99 KiB so that every config also fits sm_86/sm_89 (L40-class) GPUs.
enum class GemmConfig { kM32, kM128, kLarge };

inline GemmConfig config_for(int m) {
  return m <= 32 ? GemmConfig::kM32 : m <= 128 ? GemmConfig::kM128 : GemmConfig::kLarge;
}

// ElementOut: cutlass::half_t, cutlass::bfloat16_t (ElementBias = ElementOut), or int8_t (ElementBias
// half_t or bfloat16_t: the model's dtype; the bias is converted to float in the epilogue).
template <GemmConfig C, typename ElementOut, typename ElementBias>
size_t workspace_size(const GemmProblem& p);

template <GemmConfig C, typename ElementOut, typename ElementBias>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream);

}  // namespace smoothserve::sm80
