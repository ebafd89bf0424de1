// Small CUDA helpers that avoid ATen/cuda/CUDAContext.h (and its cuBLAS/cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace smoothserve {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }
inline int compute_capability_major() { return device_attribute(cudaDevAttrComputeCapabilityMajor); }
inline int compute_capability_minor() { return device_attribute(cudaDevAttrComputeCapabilityMinor); }

// Programmatic dependent launch (PDL, Hopper on). A kernel launched with `launch_kernel` may be scheduled
// while the kernel before it in the stream (or CUDA graph) is still running, so its launch and prologue
// overlap that kernel's tail instead of following it: at batch 1 a decode step is ~600 short kernels, and
// the gaps between them were ~1 us each. The contract that keeps this correct: every kernel launched so
// calls `wait_for_prior_grids()` before its first global memory access, read or write (it returns once
// the kernels before it have completed and their writes are visible), and may then call
// `allow_next_grid()` to let the kernel after it be scheduled early in turn. Both are no-ops before sm90
// and in a kernel launched without the attribute. CUTLASS's sm90 GEMMs keep the same contract (see
// gemm/w8a8_gemm_sm90.cuh). SMOOTHSERVE_PDL=0 turns it off (for A/B timing).
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether launches on the current device use PDL: sm90 or newer, unless SMOOTHSERVE_PDL=0.
inline bool programmatic_launch_enabled() {
  static const bool allowed = [] {
    const char* value = std::getenv("SMOOTHSERVE_PDL");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return allowed && compute_capability_major() >= 9;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), with PDL where enabled. The kernel must keep
// the contract above.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic_launch_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace smoothserve
