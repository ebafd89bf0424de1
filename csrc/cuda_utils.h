// Small CUDA helpers that avoid ATen/cuda/CUDAContext.h (and its cuBLAS/cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

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

}  // namespace smoothserve
