// W8A8 GEMM for Hopper (sm90a) on CUTLASS 3: int8 x int8 -> int32 accumulators -> fused epilogue
//
//   out[m, n] = max(a_scale[m] * (w_scale[n] * acc[m, n]) + bias[n], floor)            (fp16 / bf16)
//   out[m, n] = clamp(rint(that / out_scale), -128, 127)                              (int8)
//
// a_scale is per token [M] or a scalar, w_scale per output channel [N] or a scalar (chosen at run time
// through CUTLASS's dynamic broadcast strides), bias is optional (a null pointer reads as 0), and
// floor is 0 for a fused ReLU or -inf for none: one kernel serves every combination.
//
// Small M (decode) is memory bound on the weight stream; there the kernel runs "swapped": it
// computes out^T = W A^T, so the large N fills the 64/128-row MMA tile and the few tokens sit in the
// narrow N tile. The output is then written column-major, which is `out` row-major.
#pragma once

// Programmatic dependent launch (csrc/cuda_utils.h): CUTLASS's sm90 producer warps wait for the kernel
// before them (griddepcontrol.wait) ahead of their first loads when CUTLASS_GDC_ENABLED is set, so
// run_config launches these kernels with PDL. Set here, before any CUTLASS header, rather than through
// CUTLASS_ENABLE_GDC_FOR_SM90: that flag also compiles an early-trigger block in the Stream-K cooperative
// kernel which does not build in CUTLASS 4.2 (a const member function binds a member to a non-const
// reference). Without that block those kernels let the next one start as they exit.
#if !defined(CUTLASS_GDC_ENABLED) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CUTLASS_GDC_ENABLED
#endif

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <limits>
#include <type_traits>

#include "w8a8_epilogue.cuh"
#include "w8a8_gemm_sm90.h"
#include "run_config.cuh"

namespace smoothserve::sm90 {

using namespace cute;


// TileShape / ClusterShape in the kernel's own (possibly swapped) M, N, K.
template <typename ElementOut, typename ElementBias, typename TileShape, typename ClusterShape,
          typename KernelSchedule, typename EpilogueSchedule, typename TileScheduler, bool Swap>
struct W8A8GemmSm90 {
  static constexpr bool kInt8Out = std::is_same_v<ElementOut, int8_t>;
  static_assert(kInt8Out || std::is_same_v<ElementOut, ElementBias>, "a float output takes its bias in its own dtype");
  using ElementAcc = int32_t;
  using ElementCompute = float;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

  // In the swapped problem the tokens are the columns: the per-token scale broadcasts along rows.
  using TokenStride = conditional_t<Swap, Stride<_0, bool, _0>, Stride<bool, _0, _0>>;
  using ChannelStride = conditional_t<Swap, Stride<bool, _0, _0>, Stride<_0, bool, _0>>;
  using BiasStride = conditional_t<Swap, Stride<_1, _0, _0>, Stride<_0, _1, _0>>;

  template <typename Element, typename StrideT, bool AlongRows>
  using VectorBroadcast = conditional_t<
      AlongRows,
      cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, Element, ElementCompute, StrideT>,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, ElementCompute, StrideT>>;

  // A column broadcast holds one value per output row (M of the kernel's problem).
  using TokenScale = VectorBroadcast<float, TokenStride, !Swap>;
  using ChannelScale = VectorBroadcast<float, ChannelStride, Swap>;
  using Bias = VectorBroadcast<ElementBias, BiasStride, Swap>;
  using Floor = cutlass::epilogue::fusion::Sm90ScalarBroadcast<ElementCompute>;
  using OutScale = cutlass::epilogue::fusion::Sm90ScalarBroadcast<ElementCompute>;  // read from a device pointer
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;

  using ChannelTimesAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, Round>,
      ChannelScale, Acc>;
  using ScaledPlusBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementCompute, ElementCompute,
                                             Round>,
      TokenScale, ChannelTimesAcc, Bias>;
  using FloatEpilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::maximum, ElementOut, ElementCompute, Round>,
      ScaledPlusBias, Floor>;
  // The int8 output: one node computes the whole tail with explicit intrinsics (w8a8_epilogue.cuh),
  // from (a_scale, w_scale * acc, bias, floor, out_scale), so that engine/ops.py can reproduce it bit
  // for bit. (The float output's fma comes from the compiler contracting CUTLASS's `a * b + c`.)
  using Int8Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<epilogue::AffineFloorRequantize, ElementOut, ElementCompute, Round>,
      TokenScale, ChannelTimesAcc, Bias, Floor, OutScale>;
  using Epilogue = conditional_t<kInt8Out, Int8Epilogue, FloatEpilogue>;

  using LayoutA = cutlass::layout::RowMajor;     // the kernel's A is K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // the kernel's B is K-major
  using LayoutD = conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int AlignAB = 16;
  static constexpr int AlignD = 128 / cutlass::sizeof_bits<ElementOut>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, void, LayoutD, AlignD,
      ElementOut, LayoutD, AlignD, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, AlignAB, int8_t, LayoutB, AlignAB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const GemmProblem& p) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    // The kernel's operands: (A, B) = (activations, weights), or (weights, activations) when swapped.
    const int kernel_m = Swap ? p.n : p.m;
    const int kernel_n = Swap ? p.m : p.n;
    const int8_t* kernel_a = Swap ? p.w : p.a;
    const int8_t* kernel_b = Swap ? p.a : p.w;
    StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(kernel_m, p.k, 1));
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(kernel_n, p.k, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(kernel_m, kernel_n, 1));

    TokenStride token_stride{};
    get<Swap ? 1 : 0>(token_stride) = p.a_scale_per_token;
    ChannelStride channel_stride{};
    get<Swap ? 0 : 1>(channel_stride) = p.w_scale_per_channel;
    const float floor = p.relu ? 0.0f : -std::numeric_limits<float>::infinity();

    const typename TokenScale::Arguments token_scale{p.a_scale, 0.0f, token_stride};
    const typename ChannelTimesAcc::Arguments channel_times_acc{{p.w_scale, 0.0f, channel_stride}, {}, {}};
    const typename Bias::Arguments bias{static_cast<const ElementBias*>(p.bias), ElementBias(0.0f), {}};  // null: 0
    typename Epilogue::Arguments epilogue{};
    if constexpr (kInt8Out) {
      const typename OutScale::Arguments out_scale{{1.0f}, {p.out_scale}, {}};
      epilogue = typename Epilogue::Arguments{token_scale, channel_times_acc, bias, {{floor}}, out_scale, {}};
    } else {
      epilogue = typename Epilogue::Arguments{{token_scale, channel_times_acc, bias, {}}, {{floor}}, {}};
    }
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {kernel_m, kernel_n, p.k, 1},
        {kernel_a, stride_a, kernel_b, stride_b},
        {epilogue, nullptr, stride_d, static_cast<ElementOut*>(p.out), stride_d},
    };
    args.hw_info.device_id = p.device;
    args.hw_info.sm_count = p.sm_count;  // 0 (unset): CUTLASS asks the driver
    if constexpr (std::is_same_v<TileScheduler, cutlass::gemm::StreamKScheduler>) {
      using Decomposition = cutlass::gemm::kernel::detail::DecompositionMode;
      // splits > 1: every tile's K in equal slices, the first slice's CTA storing its int32 partial to
      // the workspace and the last one adding it before the epilogue (the only peers when splits = 2).
      args.scheduler.splits = p.splits;
      args.scheduler.decomposition_mode = p.splits > 1 ? Decomposition::SplitK : Decomposition::Heuristic;
    }
    return args;
  }
};

// The tile configurations, by M bucket (see w8a8_gemm_sm90.h).
template <GemmConfig C, typename ElementOut, typename ElementBias>
struct ConfigOf;

template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kSwapM16, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_128, _16, _256>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, true>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kSwapM64, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_128, _64, _128>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, true>;
};
// The narrow configurations: one consumer warpgroup per 64 weight rows, non-persistent (one CTA per
// tile: no workspace, no memset, no fixup). Shared memory holds 11 (M <= 16) or 6 (M <= 64) stages of
// 64x256 weights, 176 / 96 KiB in flight per SM. For M <= 64 the activations tile is as large as the
// weights tile, so a 2x1 cluster multicasts it to the CTAs of two neighbouring weight tiles, halving
// its L2 reads.
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kSwapM16Narrow, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_64, _16, _256>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecialized, cutlass::epilogue::TmaWarpSpecialized, void,
                            true>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kSwapM64Narrow, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_64, _64, _256>, Shape<_2, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecialized, cutlass::epilogue::TmaWarpSpecialized, void,
                            true>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kM256, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                            false>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kLarge, ElementOut, ElementBias> {
  using type = W8A8GemmSm90<ElementOut, ElementBias, Shape<_128, _256, _128>, Shape<_2, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                            false>;
};

template <GemmConfig C, typename ElementOut, typename ElementBias>
size_t workspace_size(const GemmProblem& p) {
  return config_workspace_size<typename ConfigOf<C, ElementOut, ElementBias>::type>(p);
}

template <GemmConfig C, typename ElementOut, typename ElementBias>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream) {
  return run_config<typename ConfigOf<C, ElementOut, ElementBias>::type, /*Programmatic=*/true>(p, workspace, stream);
}

// One translation unit per configuration compiles both output dtypes (parallel builds).
#define SMOOTHSERVE_INSTANTIATE_SM90(CONFIG)                                                                   \
  template size_t workspace_size<CONFIG, cutlass::half_t>(const GemmProblem&);                                \
  template size_t workspace_size<CONFIG, cutlass::bfloat16_t>(const GemmProblem&);                            \
  template cutlass::Status run<CONFIG, cutlass::half_t>(const GemmProblem&, void*, cudaStream_t);             \
  template cutlass::Status run<CONFIG, cutlass::bfloat16_t>(const GemmProblem&, void*, cudaStream_t);

// The int8 output, for both bias dtypes.
#define SMOOTHSERVE_INSTANTIATE_SM90_INT8(CONFIG)                                                              \
  template size_t workspace_size<CONFIG, int8_t, cutlass::half_t>(const GemmProblem&);                        \
  template size_t workspace_size<CONFIG, int8_t, cutlass::bfloat16_t>(const GemmProblem&);                    \
  template cutlass::Status run<CONFIG, int8_t, cutlass::half_t>(const GemmProblem&, void*, cudaStream_t);     \
  template cutlass::Status run<CONFIG, int8_t, cutlass::bfloat16_t>(const GemmProblem&, void*, cudaStream_t);

}  // namespace smoothserve::sm90
