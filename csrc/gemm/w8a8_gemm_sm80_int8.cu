// The sm80 W8A8 GEMM with int8 output (requantized in the epilogue), for fp16 and bf16 biases.
#include "w8a8_gemm_sm80.cuh"

namespace smoothserve::sm80 {
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM32, int8_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM32, int8_t, cutlass::bfloat16_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM128, int8_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM128, int8_t, cutlass::bfloat16_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kLarge, int8_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kLarge, int8_t, cutlass::bfloat16_t)
}  // namespace smoothserve::sm80
