// The sm80 W8A8 GEMM with fp16 / bf16 output, every M bucket (the int8 output: w8a8_gemm_sm80_int8.cu).
#include "w8a8_gemm_sm80.cuh"

namespace smoothserve::sm80 {
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM32, cutlass::half_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM32, cutlass::bfloat16_t, cutlass::bfloat16_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM128, cutlass::half_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kM128, cutlass::bfloat16_t, cutlass::bfloat16_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kLarge, cutlass::half_t, cutlass::half_t)
SMOOTHSERVE_INSTANTIATE_SM80(GemmConfig::kLarge, cutlass::bfloat16_t, cutlass::bfloat16_t)
}  // namespace smoothserve::sm80
