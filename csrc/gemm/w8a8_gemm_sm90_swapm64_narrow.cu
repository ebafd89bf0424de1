#include "w8a8_gemm_sm90.cuh"

namespace smoothserve::sm90 {
SMOOTHSERVE_INSTANTIATE_SM90(GemmConfig::kSwapM64Narrow)
}  // namespace smoothserve::sm90
