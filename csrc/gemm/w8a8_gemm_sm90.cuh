// W8A8 GEMM for Hopper (sm90a) on CUTLASS 3: int8 x int8 -> int32 accumulators -> fused epilogue
//
//   out[m, n] = max(a_scale[m] * (w_scale[n] * acc[m, n]) + bias[n], floor)
//
// a_scale is per token [M] or a scalar, w_scale per output channel [N] or a scalar (chosen at run time
// through CUTLASS's dynamic broadcast strides), bias is optional (a null pointer reads as 0), and
// floor is 0 for a fused ReLU or -inf for none: one kernel serves every combination.
//
// Small M (decode) is memory bound on the weight stream; there the kernel runs "swapped": it
// computes out^T = W A^T, so the large N fills the 64/128-row MMA tile and the few tokens sit in the
// narrow N tile. The output is then written column-major, which is `out` row-major.
#pragma once

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

#include "w8a8_gemm_sm90.h"

namespace smoothserve::sm90 {

using namespace cute;


// TileShape / ClusterShape in the kernel's own (possibly swapped) M, N, K.
template <typename ElementOut, typename TileShape, typename ClusterShape, typename KernelSchedule,
          typename EpilogueSchedule, typename TileScheduler, bool Swap>
struct W8A8GemmSm90 {
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
  using Bias = VectorBroadcast<ElementOut, BiasStride, Swap>;
  using Floor = cutlass::epilogue::fusion::Sm90ScalarBroadcast<ElementCompute>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;

  using ChannelTimesAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, Round>,
      ChannelScale, Acc>;
  using ScaledPlusBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementCompute, ElementCompute,
                                             Round>,
      TokenScale, ChannelTimesAcc, Bias>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::maximum, ElementOut, ElementCompute, Round>,
      ScaledPlusBias, Floor>;

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

    typename Epilogue::Arguments epilogue{
        {
            {p.a_scale, 0.0f, token_stride},                                   // token scale
            {{p.w_scale, 0.0f, channel_stride}, {}, {}},                       // channel scale * acc
            {static_cast<const ElementOut*>(p.bias), ElementOut(0.0f), {}},    // bias (null reads as 0)
            {},
        },
        {{floor}},
        {},
    };
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {kernel_m, kernel_n, p.k, 1},
        {kernel_a, stride_a, kernel_b, stride_b},
        {epilogue, nullptr, stride_d, static_cast<ElementOut*>(p.out), stride_d},
    };
  }
};

// The tile configurations, by M bucket (see w8a8_gemm_sm90.h).
template <GemmConfig C, typename ElementOut>
struct ConfigOf;

template <typename ElementOut>
struct ConfigOf<GemmConfig::kSwapM16, ElementOut> {
  using type = W8A8GemmSm90<ElementOut, Shape<_128, _16, _256>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, true>;
};
template <typename ElementOut>
struct ConfigOf<GemmConfig::kSwapM64, ElementOut> {
  using type = W8A8GemmSm90<ElementOut, Shape<_128, _64, _128>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler, true>;
};
template <typename ElementOut>
struct ConfigOf<GemmConfig::kM256, ElementOut> {
  using type = W8A8GemmSm90<ElementOut, Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                            false>;
};
template <typename ElementOut>
struct ConfigOf<GemmConfig::kLarge, ElementOut> {
  using type = W8A8GemmSm90<ElementOut, Shape<_128, _256, _128>, Shape<_2, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                            false>;
};

template <GemmConfig C, typename ElementOut>
size_t workspace_size(const GemmProblem& p) {
  using Config = typename ConfigOf<C, ElementOut>::type;
  return Config::Gemm::get_workspace_size(Config::arguments(p));
}

template <GemmConfig C, typename ElementOut>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream) {
  using Config = typename ConfigOf<C, ElementOut>::type;
  typename Config::Gemm gemm;
  auto args = Config::arguments(p);
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return status;
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return status;
  return gemm.run(stream);
}

// One translation unit per configuration compiles both output dtypes (parallel builds).
#define SMOOTHSERVE_INSTANTIATE_SM90(CONFIG)                                                                   \
  template size_t workspace_size<CONFIG, cutlass::half_t>(const GemmProblem&);                                \
  template size_t workspace_size<CONFIG, cutlass::bfloat16_t>(const GemmProblem&);                            \
  template cutlass::Status run<CONFIG, cutlass::half_t>(const GemmProblem&, void*, cudaStream_t);             \
  template cutlass::Status run<CONFIG, cutlass::bfloat16_t>(const GemmProblem&, void*, cudaStream_t);

}  // namespace smoothserve::sm90
