// Small CUDA helpers that avoid ATen/cuda/CUDAContext.h (and its cuBLAS/cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

namespace smoothserve {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// What the ops ask of the current device on every call, read once per device: an eager prefill step of
// OPT-30B launches ~400 kernels and asked the driver ~2000 times (a millisecond of host time).
struct DeviceFacts {
  int sm_count;
  int major;
  int minor;
};

inline const DeviceFacts& device_facts(int device) {
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "device index ", device, " out of range");
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  static DeviceFacts facts[C10_COMPILE_TIME_MAX_GPUS];
  std::call_once(once[device], [device] {
    DeviceFacts& f = facts[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, device));
  });
  return facts[device];
}

inline int current_device_index() { return c10::cuda::current_device(); }
inline int sm_count() { return device_facts(current_device_index()).sm_count; }
inline int compute_capability_major() { return device_facts(current_device_index()).major; }
inline int compute_capability_minor() { return device_facts(current_device_index()).minor; }

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
