// w8a8_gemm: checks, allocation and the choice of kernel by device and M.
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_utils.h"
#include "../ops.h"
#include "w8a8_gemm_sm90.h"

namespace smoothserve {
namespace {

template <typename ElementOut>
void run_sm90(const sm90::GemmProblem& p, const torch::Tensor& like) {
  using sm90::GemmConfig;
  // Buckets: decode-sized M is memory bound (swap A/B so the weights fill the wide MMA tile side).
  const GemmConfig config = p.m <= 16   ? GemmConfig::kSwapM16
                            : p.m <= 64  ? GemmConfig::kSwapM64
                            : p.m <= 256 ? GemmConfig::kM256
                                         : GemmConfig::kLarge;
  auto launch = [&](auto config_tag) {
    constexpr GemmConfig C = decltype(config_tag)::value;
    const size_t bytes = sm90::workspace_size<C, ElementOut>(p);
    auto workspace = torch::empty({static_cast<int64_t>(bytes)}, like.options().dtype(torch::kUInt8));
    const cutlass::Status status =
        sm90::run<C, ElementOut>(p, workspace.data_ptr(), current_stream());
    TORCH_CHECK(status == cutlass::Status::kSuccess, "w8a8_gemm: CUTLASS failed: ", cutlassGetStatusString(status),
                " (M=", p.m, ", N=", p.n, ", K=", p.k, ")");
  };
  switch (config) {
    case GemmConfig::kSwapM16: launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM16>{}); break;
    case GemmConfig::kSwapM64: launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM64>{}); break;
    case GemmConfig::kM256: launch(std::integral_constant<GemmConfig, GemmConfig::kM256>{}); break;
    case GemmConfig::kLarge: launch(std::integral_constant<GemmConfig, GemmConfig::kLarge>{}); break;
  }
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

torch::Tensor w8a8_gemm(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                        const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias, bool relu,
                        at::ScalarType out_dtype) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a_scale.is_cuda() && w_scale.is_cuda(), "w8a8_gemm: tensors must be on CUDA");
  TORCH_CHECK(a.scalar_type() == torch::kInt8 && w.scalar_type() == torch::kInt8, "w8a8_gemm: a and w must be int8");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "w8a8_gemm: a [M, K] and w [N, K] expected");
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous(), "w8a8_gemm: a and w must be contiguous");
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1);
  TORCH_CHECK(k % 16 == 0 && n % 16 == 0, "w8a8_gemm: K and N must be multiples of 16, got K=", k, ", N=", n);
  TORCH_CHECK(aligned16(a) && aligned16(w), "w8a8_gemm: a and w must be 16-byte aligned");
  TORCH_CHECK(a_scale.scalar_type() == torch::kFloat && w_scale.scalar_type() == torch::kFloat,
              "w8a8_gemm: scales must be float32");
  TORCH_CHECK(a_scale.is_contiguous() && w_scale.is_contiguous(), "w8a8_gemm: scales must be contiguous");
  TORCH_CHECK(a_scale.numel() == m || a_scale.numel() == 1, "w8a8_gemm: a_scale must have M or 1 elements");
  TORCH_CHECK(w_scale.numel() == n || w_scale.numel() == 1, "w8a8_gemm: w_scale must have N or 1 elements");
  TORCH_CHECK(out_dtype == torch::kHalf || out_dtype == torch::kBFloat16, "w8a8_gemm: output must be fp16 or bf16");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->is_contiguous() && bias->numel() == n, "w8a8_gemm: bias must be [N]");
    TORCH_CHECK(bias->scalar_type() == out_dtype, "w8a8_gemm: bias must have the output dtype");
  }
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = torch::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0) return out;

  const sm90::GemmProblem problem{
      a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), a_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(),
      static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
      a_scale.numel() == m, w_scale.numel() == n, relu};
  const int major = compute_capability_major();
  TORCH_CHECK(major == 9, "w8a8_gemm: this build has a kernel for Hopper (sm_90a) only; device is sm_", major,
              compute_capability_minor());
  if (out_dtype == torch::kHalf) {
    run_sm90<cutlass::half_t>(problem, a);
  } else {
    run_sm90<cutlass::bfloat16_t>(problem, a);
  }
  return out;
}

}  // namespace smoothserve
