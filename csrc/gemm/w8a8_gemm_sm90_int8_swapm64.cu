// The Hopper W8A8 GEMM with int8 output (requantized in the epilogue), kSwapM64 configuration.
#include "w8a8_gemm_sm90.cuh"

namespace smoothserve::sm90 {
SMOOTHSERVE_INSTANTIATE_SM90_INT8(GemmConfig::kSwapM64)
}  // namespace smoothserve::sm90
