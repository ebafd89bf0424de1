// W8A8 GEMM for Ampere-class GPUs (sm80) on CUTLASS 2.x, with the epilogue as a visitor tree (EVT):
//
//   out[m, n] = max(a_scale[m|0] * (w_scale[n|0] * acc[m, n]) + bias[n], floor)      (fp16 / bf16)
//   out[m, n] = clamp(rint(that / out_scale), -128, 127)                            (int8)
//
// The float32 operations and their order are those of the sm90 kernel (w8a8_epilogue.cuh).
//
// Scale granularity is chosen at run time with one kernel: each scale is the product of a vector
// visitor and a scalar visitor, and exactly one of the two is given a pointer; the other reads as 1.0,
// so the product is the scale itself, exactly. (CUTLASS 2.x's row broadcast loads 16-byte vectors and
// cannot take a zero stride, which is how the sm90 kernel handles a scalar.)
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/functional.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
// The 2.x visitors are not self-contained: they need the GEMM headers above first.
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>

#include <limits>
#include <type_traits>

#include "w8a8_epilogue.cuh"
#include "w8a8_gemm_sm80.h"
#include "run_config.cuh"

namespace smoothserve::sm80 {

using namespace cute;
namespace evt = cutlass::epilogue::threadblock;

template <typename ElementOut, typename ElementBias, typename ThreadblockShape, typename WarpShape, int Stages>
struct W8A8GemmSm80 {
  static constexpr bool kInt8Out = std::is_same_v<ElementOut, int8_t>;
  static_assert(kInt8Out || std::is_same_v<ElementOut, ElementBias>, "a float output takes its bias in its own dtype");

  using ElementAcc = int32_t;
  using ElementCompute = float;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int AlignAB = 16;  // 16 int8 = one 128-bit cp.async: K must be a multiple of 16

  // The epilogue moves accumulators through shared memory in the layout of a 16-bit output, 8 per
  // access. An int8 output reuses that layout (and writes 8 bytes per access) rather than CUTLASS's
  // int8-specific epilogue iterators: the visitor's thread map below must describe the same layout as
  // the base epilogue, and this pairing is the one CUTLASS's fp16/bf16 EVT GEMMs use.
  using ElementCarrier = std::conditional_t<kInt8Out, cutlass::half_t, ElementOut>;
  static constexpr int AlignCarrier = 8;
  static constexpr int EpilogueStages = 1;
  using ThreadMap =
      evt::OutputTileThreadLayout<ThreadblockShape, WarpShape, ElementCarrier, AlignCarrier, EpilogueStages>;

  using Acc = evt::VisitorAccFetch;
  using Scalar = evt::VisitorScalarBroadcast<ElementCompute>;  // a value, or a device pointer to one
  using TokenVector = evt::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, _0>>;  // one per row (token)
  using ChannelVector = evt::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, _0>>;  // one per column
  using Bias = evt::VisitorRowBroadcast<ThreadMap, ElementBias, Stride<_0, _1, _0>>;  // null reads as 0
  using Multiply = evt::VisitorCompute<cutlass::multiplies, ElementCompute, ElementCompute, Round>;

  using TokenScale = evt::Sm80EVT<Multiply, TokenVector, Scalar>;
  using ChannelScale = evt::Sm80EVT<Multiply, ChannelVector, Scalar>;
  using ChannelTimesAcc = evt::Sm80EVT<Multiply, ChannelScale, Acc>;  // w_scale * float(acc)

  // Children of the tail: (a_scale, w_scale * acc, bias, floor[, out_scale]).
  using FloatTail = evt::Sm80EVT<evt::VisitorCompute<epilogue::AffineFloor, ElementOut, ElementCompute, Round>,
                                 TokenScale, ChannelTimesAcc, Bias, Scalar>;
  using Int8Tail =
      evt::Sm80EVT<evt::VisitorCompute<epilogue::AffineFloorRequantize, ElementOut, ElementCompute, Round>,
                   TokenScale, ChannelTimesAcc, Bias, Scalar, Scalar>;
  using Tail = std::conditional_t<kInt8Out, Int8Tail, FloatTail>;

  using Store = evt::VisitorAuxStore<ThreadMap, ElementOut, Round, Stride<int64_t, _1, int64_t>>;
  using Epilogue = evt::Sm80EVT<Store, Tail>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, AlignAB,     // A [M, K]
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, AlignAB,  // B = w^T: [K, N], K-major
      ElementCarrier, cutlass::layout::RowMajor, AlignCarrier,
      ElementAcc, ElementCompute, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
      InstructionShape, Epilogue, cutlass::gemm::threadblock::ThreadblockSwizzleStreamK, Stages,
      // Saturation only matters past |acc| = 2^31, i.e. K > 131072: never for these models.
      cutlass::arch::OpMultiplyAddSaturate, EpilogueStages>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Mainloop and epilogue share memory (a union): the whole of it must fit sm_86/sm_89's 99 KiB per
  // block, not only A100's 163 KiB (see w8a8_gemm_sm80.h).
  static_assert(sizeof(typename Kernel::SharedStorage) <= 99 * 1024, "tile config exceeds 99 KiB of smem");

  // A per-element scale from a [M]/[N] vector or a [1] scalar: exactly one of the two visitors gets the
  // pointer, the other reads as 1.
  template <typename ScaleEvt, typename VectorArguments>
  static typename ScaleEvt::Arguments scale_arguments(const float* scale, bool is_vector) {
    return {VectorArguments{is_vector ? scale : nullptr, 1.0f, {}},
            typename Scalar::Arguments{{1.0f}, {is_vector ? nullptr : scale}, {}},
            typename Multiply::Arguments{}};
  }

  static typename Gemm::Arguments arguments(const GemmProblem& p) {
    const auto token_scale =
        scale_arguments<TokenScale, typename TokenVector::Arguments>(p.a_scale, p.a_scale_per_token);
    const auto channel_scale =
        scale_arguments<ChannelScale, typename ChannelVector::Arguments>(p.w_scale, p.w_scale_per_channel);
    const typename ChannelTimesAcc::Arguments channel_times_acc{channel_scale, typename Acc::Arguments{},
                                                                typename Multiply::Arguments{}};
    const typename Bias::Arguments bias{static_cast<const ElementBias*>(p.bias), ElementBias(0.0f), {}};
    const typename Scalar::Arguments floor{{p.relu ? 0.0f : -std::numeric_limits<float>::infinity()}, {nullptr}, {}};

    typename Tail::Arguments tail{};
    if constexpr (kInt8Out) {
      const typename Scalar::Arguments out_scale{{1.0f}, {p.out_scale}, {}};
      tail = typename Tail::Arguments{token_scale, channel_times_acc, bias, floor, out_scale, {}};
    } else {
      tail = typename Tail::Arguments{token_scale, channel_times_acc, bias, floor, {}};
    }
    const typename Store::Arguments store{static_cast<ElementOut*>(p.out),
                                          {static_cast<int64_t>(p.n), _1{}, static_cast<int64_t>(p.m) * p.n}};
    const typename Epilogue::Arguments epilogue{tail, store};

    // Scheduling. ThreadblockSwizzleStreamK balances K across CTAs only in kGemm mode; in any other
    // non-batched mode it schedules whole tiles, data-parallel, and then never touches its workspace
    // or the visitor epilogue's peer-reduction path (EpilogueWithVisitorCallbacks::reduce). That
    // data-parallel use of this kernel (kGemmSplitKParallel, batch 1) is the well-trodden one (it is
    // how vLLM runs its CUTLASS 2.x EVT GEMMs); stream-K proper with a visitor epilogue is exercised
    // by little beyond CUTLASS's example 47, so it stays opt-in (p.stream_k) until the GPU tests have
    // passed with it. It matters for decode (M <= 32), where N / 128 tiles leave most SMs idle.
    const auto mode = p.stream_k ? cutlass::gemm::GemmUniversalMode::kGemm
                                 : cutlass::gemm::GemmUniversalMode::kGemmSplitKParallel;
    return typename Gemm::Arguments(mode, {p.m, p.n, p.k},
                                    /*batch_split (1: stream-K decides in kGemm mode)*/ 1, epilogue, p.a, p.w,
                                    /*ptr_C, ptr_D: the visitors store*/ nullptr, nullptr,
                                    /*batch strides*/ static_cast<int64_t>(p.m) * p.k,
                                    static_cast<int64_t>(p.n) * p.k, 0, 0,
                                    /*lda, ldb*/ static_cast<int64_t>(p.k), static_cast<int64_t>(p.k),
                                    /*ldc, ldd*/ 0, 0);
  }
};

template <GemmConfig C, typename ElementOut, typename ElementBias>
struct ConfigOf;

template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kM32, ElementOut, ElementBias> {
  using type = W8A8GemmSm80<ElementOut, ElementBias, cutlass::gemm::GemmShape<32, 128, 128>,
                            cutlass::gemm::GemmShape<32, 32, 128>, 4>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kM128, ElementOut, ElementBias> {
  using type = W8A8GemmSm80<ElementOut, ElementBias, cutlass::gemm::GemmShape<64, 128, 128>,
                            cutlass::gemm::GemmShape<32, 64, 128>, 3>;
};
template <typename ElementOut, typename ElementBias>
struct ConfigOf<GemmConfig::kLarge, ElementOut, ElementBias> {
  using type = W8A8GemmSm80<ElementOut, ElementBias, cutlass::gemm::GemmShape<128, 256, 64>,
                            cutlass::gemm::GemmShape<64, 64, 64>, 3>;
};

template <GemmConfig C, typename ElementOut, typename ElementBias>
size_t workspace_size(const GemmProblem& p) {
  return config_workspace_size<typename ConfigOf<C, ElementOut, ElementBias>::type>(p);
}

template <GemmConfig C, typename ElementOut, typename ElementBias>
cutlass::Status run(const GemmProblem& p, void* workspace, cudaStream_t stream) {
  return run_config<typename ConfigOf<C, ElementOut, ElementBias>::type>(p, workspace, stream);
}

#define SMOOTHSERVE_INSTANTIATE_SM80(CONFIG, OUT, BIAS)                                            \
  template size_t workspace_size<CONFIG, OUT, BIAS>(const GemmProblem&);                          \
  template cutlass::Status run<CONFIG, OUT, BIAS>(const GemmProblem&, void*, cudaStream_t);

}  // namespace smoothserve::sm80
