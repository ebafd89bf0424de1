// The Hopper W8A8 GEMM with int8 output (requantized in the epilogue), kSwapM16 configuration: the
// decode-sized fc1 of O3 streams its weights as fast as the fp16-output kSwapM16 does (kSwapM64 ran
// OPT-30B fc1 at M = 1 in 86.8 us against 76 us).
#include "w8a8_gemm_sm90.cuh"

namespace smoothserve::sm90 {
SMOOTHSERVE_INSTANTIATE_SM90_INT8(GemmConfig::kSwapM16)
}  // namespace smoothserve::sm90
