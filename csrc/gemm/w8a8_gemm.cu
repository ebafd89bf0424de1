// w8a8_gemm and w8a8_gemm_int8_out: checks, allocation, and the choice of kernel by device, by M and by
// how many output tiles the problem gives each SM.
//
// Kernel family by compute capability: 9.x runs the CUTLASS 3 Hopper kernels (sm90a: TMA, wgmma);
// every other GPU of capability >= 8.0 runs the CUTLASS 2.x kernels (int8 mma.sync). The environment
// variable SMOOTHSERVE_GEMM_ARCH overrides that choice: "sm80" runs the CUTLASS 2.x kernels on any such
// GPU, Hopper included (how they are tested on an H100), "sm90" insists on the Hopper kernels, and
// "auto" (or unset) chooses by device.
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "../cuda_utils.h"
#include "../ops.h"
#include "w8a8_gemm_problem.h"
#include "w8a8_gemm_sm80.h"
#include "w8a8_gemm_sm90.h"

namespace smoothserve {
namespace {

enum class KernelFamily { kSm80, kSm90 };

// SMOOTHSERVE_GEMM_ARCH is read on every call (one getenv, a fraction of a microsecond next to a GEMM
// launch) so that a test can switch it within one process. A CUDA graph keeps the kernels chosen when
// it was captured.
KernelFamily kernel_family(const char* op) {
  const int major = compute_capability_major();
  const int minor = compute_capability_minor();
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer (int8 tensor cores); device is sm_",
              major, minor);
  const char* env = std::getenv("SMOOTHSERVE_GEMM_ARCH");
  const std::string forced = env == nullptr ? "" : env;
  if (forced == "sm80") return KernelFamily::kSm80;
  if (forced == "sm90") {
    TORCH_CHECK(major == 9, op, ": SMOOTHSERVE_GEMM_ARCH=sm90 needs a Hopper GPU (sm_90a); device is sm_", major,
                minor);
    return KernelFamily::kSm90;
  }
  TORCH_CHECK(forced.empty() || forced == "auto", op, ": SMOOTHSERVE_GEMM_ARCH must be auto, sm80 or sm90, got '",
              forced, "'");
  // Newer GPUs than Hopper also take the mma.sync kernels; they run only where the build holds code for
  // them (TORCH_CUDA_ARCH_LIST), otherwise CUTLASS reports the failed launch.
  return major == 9 ? KernelFamily::kSm90 : KernelFamily::kSm80;
}

// One kernel configuration, with its workspace (stream-K partials and flags) from torch's caching
// allocator, so that the call can be captured in a CUDA graph.
template <typename WorkspaceSize, typename Run>
void run_kernel(const char* op, const GemmProblem& p, const torch::Tensor& like, WorkspaceSize workspace_size,
                Run run) {
  const size_t bytes = workspace_size(p);
  torch::Tensor workspace;  // most decode and data-parallel configurations need none
  if (bytes > 0) workspace = torch::empty({static_cast<int64_t>(bytes)}, like.options().dtype(torch::kUInt8));
  const cutlass::Status status = run(p, bytes > 0 ? workspace.data_ptr() : nullptr, current_stream());
  TORCH_CHECK(status == cutlass::Status::kSuccess, op, ": CUTLASS failed: ", cutlassGetStatusString(status),
              " (M=", p.m, ", N=", p.n, ", K=", p.k, ")");
}

// What the sm90 path runs: a tile configuration and, for the stream-K scheduler's, GemmProblem::splits.
struct Sm90Schedule {
  sm90::GemmConfig config;
  int splits;
};

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Splits for a stream-K-scheduler configuration with `tiles` output tiles of `k_tiles` K steps each.
// Left to CUTLASS's heuristic (1), a problem of fewer tiles than half the SMs becomes stream-K with up
// to ~3 CTAs per tile, and the middle ones add their int32 partials with atomics, one after the other:
// on the H100 OPT-13B out_proj at M = 128 took 22.7 us that way against 19.2 us for twice the work at
// M = 256 (80 whole tiles, data-parallel). Two slices have no middle CTA: the first stores its partial,
// the second adds it and runs the epilogue, and all 2 x tiles CTAs run at once. K must give each slice
// at least 8 steps (CUTLASS's own minimum for a stream-K unit); shorter problems are not worth a fixup.
int splits_for(int tiles, int k_tiles, int sms) { return 2 * tiles <= sms && k_tiles >= 16 ? 2 : 1; }

Sm90Schedule sm90_schedule(const GemmProblem& p, int sms, bool int8_out) {
  using sm90::GemmConfig;
  if (p.m <= 64) {
    // Decode: bound by the weight stream, so the kernel runs swapped (weights fill the MMA's M side).
    // With at most one 64-row tile per SM (N <= 8448 on 132 SMs: OPT-13B/30B out_proj and fc2), each
    // CTA streams its own rows to the end and none waits on another: no workspace memset, no fixup.
    // The 128-row kernels left those N to stream-K over 40 / 56 tiles and streamed their weights at
    // 1.5 / 2.0 TB/s (out_proj at M = 1: 17.0 / 26.1 us), where OPT-66B's out_proj, 72 whole tiles
    // data-parallel, reached 2.4 TB/s. Not for the int8 output, which has no narrow build: it serves
    // fc1 (N = 4h), whose 64-row tiles outnumber the SMs from OPT-2.7B up.
    if (!int8_out && ceil_div(p.n, 64) <= sms) {
      return {p.m <= 16 ? GemmConfig::kSwapM16Narrow : GemmConfig::kSwapM64Narrow, 1};
    }
    // Wider N (or the int8 output): 128-row tiles, whose partial last wave CUTLASS balances with
    // stream-K; splits_for takes over where they are few.
    const int k_step = p.m <= 16 ? 256 : 128;
    return {p.m <= 16 ? GemmConfig::kSwapM16 : GemmConfig::kSwapM64,
            splits_for(ceil_div(p.n, 128), ceil_div(p.k, k_step), sms)};
  }
  // 128x128 tiles, in pairs along N (the 1x2 cluster), for 64 < M <= 256: split in 2 along K where
  // they are few (OPT-13B out_proj at M = 128: 40 tiles, 20.3 us against 22.7 us under stream-K).
  // Not for the int8 output, which has no kM256 build.
  if (!int8_out && p.m <= 256) {
    return {GemmConfig::kM256, splits_for(ceil_div(p.m, 128) * 2 * ceil_div(p.n, 256), ceil_div(p.k, 128), sms)};
  }
  // Larger M: 128x256 tiles, CUTLASS's own stream-K heuristic. Measured on the H100, kM256 in its place
  // was slower for OPT-13B out_proj at M = 512 (33.3 us against 31.0 us, 80 tiles of 128x256).
  if (p.m > 256) return {GemmConfig::kLarge, 1};
  // The int8 output at 64 < M <= 256 (no kM256 build): the same tiles, split in 2 where they are few.
  return {GemmConfig::kLarge, splits_for(ceil_div(p.m, 128) * ceil_div(p.n, 256), ceil_div(p.k, 128), sms)};
}

template <typename ElementOut, typename ElementBias>
void run_sm90(const char* op, const GemmProblem& problem, const torch::Tensor& like) {
  using sm90::GemmConfig;
  constexpr bool kInt8Out = std::is_same_v<ElementOut, int8_t>;
  const int device = current_device_index();
  const int sms = device_facts(device).sm_count;
  const Sm90Schedule schedule = sm90_schedule(problem, sms, kInt8Out);
  GemmProblem p = problem;
  p.splits = schedule.splits;
  p.sm_count = sms;
  p.device = device;
  auto launch = [&](auto config_tag) {
    constexpr GemmConfig C = decltype(config_tag)::value;
    run_kernel(op, p, like, &sm90::workspace_size<C, ElementOut, ElementBias>, &sm90::run<C, ElementOut, ElementBias>);
  };
  // Three int8-output configurations are built (each sm90 instantiation costs about a minute of compile
  // time), so the fp16/bf16-only ones are named under `if constexpr`.
  switch (schedule.config) {
    case GemmConfig::kSwapM16: launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM16>{}); return;
    case GemmConfig::kSwapM64: launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM64>{}); return;
    case GemmConfig::kLarge: launch(std::integral_constant<GemmConfig, GemmConfig::kLarge>{}); return;
    default: break;
  }
  if constexpr (!kInt8Out) {
    switch (schedule.config) {
      case GemmConfig::kSwapM16Narrow:
        launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM16Narrow>{});
        return;
      case GemmConfig::kSwapM64Narrow:
        launch(std::integral_constant<GemmConfig, GemmConfig::kSwapM64Narrow>{});
        return;
      case GemmConfig::kM256: launch(std::integral_constant<GemmConfig, GemmConfig::kM256>{}); return;
      default: break;
    }
  }
  TORCH_CHECK(false, op, ": no sm90 kernel built for configuration ", static_cast<int>(schedule.config));
}

// SMOOTHSERVE_SM80_STREAMK=1 lets the sm80 kernels split K across CTAs (stream-K); unset or 0, they
// run whole tiles data-parallel (w8a8_gemm_sm80.cuh says why that is the default). Read on every call,
// like SMOOTHSERVE_GEMM_ARCH, so that a test can compare the two in one process.
bool sm80_stream_k(const char* op) {
  const char* env = std::getenv("SMOOTHSERVE_SM80_STREAMK");
  const std::string value = env == nullptr ? "" : env;
  TORCH_CHECK(value.empty() || value == "0" || value == "1", op, ": SMOOTHSERVE_SM80_STREAMK must be 0 or 1, got '",
              value, "'");
  return value == "1";
}

template <typename ElementOut, typename ElementBias>
void run_sm80(const char* op, const GemmProblem& problem, const torch::Tensor& like) {
  using sm80::GemmConfig;
  GemmProblem p = problem;
  p.stream_k = sm80_stream_k(op);
  auto launch = [&](auto config_tag) {
    constexpr GemmConfig C = decltype(config_tag)::value;
    run_kernel(op, p, like, &sm80::workspace_size<C, ElementOut, ElementBias>, &sm80::run<C, ElementOut, ElementBias>);
  };
  switch (sm80::config_for(p.m)) {
    case GemmConfig::kM32: launch(std::integral_constant<GemmConfig, GemmConfig::kM32>{}); break;
    case GemmConfig::kM128: launch(std::integral_constant<GemmConfig, GemmConfig::kM128>{}); break;
    case GemmConfig::kLarge: launch(std::integral_constant<GemmConfig, GemmConfig::kLarge>{}); break;
  }
}

template <typename ElementOut, typename ElementBias>
void run_gemm(const char* op, const GemmProblem& p, const torch::Tensor& like) {
  if (kernel_family(op) == KernelFamily::kSm90) {
    run_sm90<ElementOut, ElementBias>(op, p, like);
  } else {
    run_sm80<ElementOut, ElementBias>(op, p, like);
  }
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The epilogue reads its [M] / [N] vectors 16 bytes at a time. A view that starts off a 16-byte boundary
// is copied (a fresh allocation is aligned); parameters and fresh activations never need it.
torch::Tensor aligned_copy_if_needed(const torch::Tensor& t) { return aligned16(t) ? t : t.clone(); }

// The checks both ops share; returns (M, N, K).
std::tuple<int64_t, int64_t, int64_t> check_operands(const char* op, const torch::Tensor& a, const torch::Tensor& w,
                                                     const torch::Tensor& a_scale, const torch::Tensor& w_scale) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a_scale.is_cuda() && w_scale.is_cuda(), op, ": tensors must be on CUDA");
  TORCH_CHECK(w.device() == a.device() && a_scale.device() == a.device() && w_scale.device() == a.device(), op,
              ": tensors must be on one device");
  TORCH_CHECK(a.scalar_type() == torch::kInt8 && w.scalar_type() == torch::kInt8, op, ": a and w must be int8");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), op, ": a [M, K] and w [N, K] expected");
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous(), op, ": a and w must be contiguous");
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1);
  TORCH_CHECK(k % 16 == 0 && n % 16 == 0, op, ": K and N must be multiples of 16, got K=", k, ", N=", n);
  // K = 0 would reach CUTLASS's host-side tile arithmetic as a division by zero (FastDivmod of 0
  // iterations per tile in the stream-K swizzle): a crash of the process, not an error.
  TORCH_CHECK(k > 0, op, ": K must be positive");
  TORCH_CHECK(aligned16(a) && aligned16(w), op, ": a and w must be 16-byte aligned");
  TORCH_CHECK(a_scale.scalar_type() == torch::kFloat && w_scale.scalar_type() == torch::kFloat, op,
              ": scales must be float32");
  TORCH_CHECK(a_scale.is_contiguous() && w_scale.is_contiguous(), op, ": scales must be contiguous");
  TORCH_CHECK(a_scale.numel() == m || a_scale.numel() == 1, op, ": a_scale must have M or 1 elements");
  TORCH_CHECK(w_scale.numel() == n || w_scale.numel() == 1, op, ": w_scale must have N or 1 elements");
  return {m, n, k};
}

void check_bias(const char* op, const std::optional<torch::Tensor>& bias, const torch::Tensor& a, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->is_cuda() && bias->device() == a.device(), op, ": bias must be on the device of a");
  TORCH_CHECK(bias->is_contiguous() && bias->numel() == n, op, ": bias must be a contiguous [N]");
}

GemmProblem make_problem(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                         const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias,
                         const float* out_scale, torch::Tensor& out, bool relu) {
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1);
  return GemmProblem{
      a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), a_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr() : nullptr, out_scale, out.data_ptr(),
      static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
      a_scale.numel() == m, w_scale.numel() == n, relu};
}

}  // namespace

torch::Tensor w8a8_gemm(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                        const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias, bool relu,
                        at::ScalarType out_dtype) {
  constexpr const char* op = "w8a8_gemm";
  const auto [m, n, k] = check_operands(op, a, w, a_scale, w_scale);
  TORCH_CHECK(out_dtype == torch::kHalf || out_dtype == torch::kBFloat16, op, ": output must be fp16 or bf16");
  check_bias(op, bias, a, n);
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == out_dtype, op, ": bias must have the output dtype");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = torch::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;

  const auto a_scale_ = aligned_copy_if_needed(a_scale);
  const auto w_scale_ = aligned_copy_if_needed(w_scale);
  const auto bias_ = bias.has_value() ? std::optional<torch::Tensor>(aligned_copy_if_needed(*bias)) : std::nullopt;
  const GemmProblem problem = make_problem(a, w, a_scale_, w_scale_, bias_, nullptr, out, relu);
  if (out_dtype == torch::kHalf) {
    run_gemm<cutlass::half_t, cutlass::half_t>(op, problem, a);
  } else {
    run_gemm<cutlass::bfloat16_t, cutlass::bfloat16_t>(op, problem, a);
  }
  return out;
}

torch::Tensor w8a8_gemm_int8_out(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                                 const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias, bool relu,
                                 const torch::Tensor& out_scale) {
  constexpr const char* op = "w8a8_gemm_int8_out";
  const auto [m, n, k] = check_operands(op, a, w, a_scale, w_scale);
  check_bias(op, bias, a, n);
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == torch::kHalf || bias->scalar_type() == torch::kBFloat16, op,
              ": bias must be fp16 or bf16");
  TORCH_CHECK(out_scale.is_cuda() && out_scale.device() == a.device(), op, ": out_scale must be on the device of a");
  TORCH_CHECK(out_scale.scalar_type() == torch::kFloat && out_scale.numel() == 1, op,
              ": out_scale must be a float32 tensor of 1 element");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = torch::empty({m, n}, a.options().dtype(torch::kInt8));
  if (m == 0 || n == 0) return out;

  const auto a_scale_ = aligned_copy_if_needed(a_scale);
  const auto w_scale_ = aligned_copy_if_needed(w_scale);
  const auto bias_ = bias.has_value() ? std::optional<torch::Tensor>(aligned_copy_if_needed(*bias)) : std::nullopt;
  const GemmProblem problem =
      make_problem(a, w, a_scale_, w_scale_, bias_, out_scale.data_ptr<float>(), out, relu);
  // Without a bias the bias type only names a kernel (its null pointer reads as 0).
  if (bias.has_value() && bias->scalar_type() == torch::kBFloat16) {
    run_gemm<int8_t, cutlass::bfloat16_t>(op, problem, a);
  } else {
    run_gemm<int8_t, cutlass::half_t>(op, problem, a);
  }
  return out;
}

}  // namespace smoothserve
