// Running one CUTLASS GEMM configuration through its device-level adapter. CUTLASS 2.x (sm80) and 3.x
// (sm90) adapters share this interface, so both kernel families use these two functions.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include <cutlass/cutlass.h>

#include "../cuda_utils.h"
#include "w8a8_gemm_problem.h"

namespace smoothserve {

// Config: a type with `Gemm` (the device adapter) and `static Gemm::Arguments arguments(const GemmProblem&)`.
template <typename Config>
size_t config_workspace_size(const GemmProblem& p) {
  return Config::Gemm::get_workspace_size(Config::arguments(p));
}

// Programmatic: launch with PDL where enabled (cuda_utils.h); only for CUTLASS 3 (sm90) kernels built with
// CUTLASS_GDC_ENABLED (w8a8_gemm_sm90.cuh), which wait for the kernel before them ahead of any global access.
template <typename Config, bool Programmatic = false>
cutlass::Status run_config(const GemmProblem& p, void* workspace, cudaStream_t stream) {
  typename Config::Gemm gemm;
  const auto args = Config::arguments(p);
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return status;
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return status;
  if constexpr (Programmatic) {
    return gemm.run(stream, /*cuda_adapter=*/nullptr, /*launch_with_pdl=*/programmatic_launch_enabled());
  } else {
    return gemm.run(stream);
  }
}

}  // namespace smoothserve
