// The element-wise tail of every W8A8 GEMM epilogue, shared by the sm80 and sm90 kernels so that the
// two compute the same float32 operations in the same order (engine/ops.py's references mirror it):
//
//   t = w_scale * float(acc)                       one rounding (CUTLASS multiplies, before this tail)
//   y = max(fma(a_scale, t, bias), floor)          one rounding; floor = 0 (ReLU) or -inf
//   q = clamp(rint(y / out_scale), -128, 127)      int8 output only: correctly rounded division,
//                                                  rint = round half to even
//
// The intrinsics are explicit (__fmaf_rn, __fdiv_rn) because the build uses --use_fast_math, which
// would otherwise turn `y / s` into an approximate reciprocal-multiply, and because a plain `a * t + b`
// is fused into an fma only at the compiler's discretion. (--use_fast_math also flushes float32
// denormals to zero: epilogue values of magnitude < 1.2e-38 read as 0 here; they requantize to 0
// either way unless out_scale is itself denormal.)
//
// Each functor has a scalar primary template (CUTLASS's sm90 visitor instantiates ComputeFn<float> to
// look for an Arguments member) and an Array specialization, which is the one the visitors call.
#pragma once

#include <cuda_runtime.h>

#include <cutlass/array.h>
#include <cutlass/cutlass.h>

namespace smoothserve::epilogue {

__device__ __forceinline__ float affine_floor(float a_scale, float scaled_acc, float bias, float floor) {
  return fmaxf(__fmaf_rn(a_scale, scaled_acc, bias), floor);
}

// An exact integer in [-128, 127], so the final float -> int8 conversion is exact whatever its rounding.
__device__ __forceinline__ float requantize(float y, float out_scale) {
  return fminf(fmaxf(rintf(__fdiv_rn(y, out_scale)), -128.0f), 127.0f);
}

template <typename T>
struct AffineFloor {
  __device__ T operator()(T const& a_scale, T const& scaled_acc, T const& bias, T const& floor) const {
    return affine_floor(a_scale, scaled_acc, bias, floor);
  }
};

template <typename T, int N>
struct AffineFloor<cutlass::Array<T, N>> {
  __device__ cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& a_scale,
                                             cutlass::Array<T, N> const& scaled_acc,
                                             cutlass::Array<T, N> const& bias,
                                             cutlass::Array<T, N> const& floor) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = affine_floor(a_scale[i], scaled_acc[i], bias[i], floor[i]);
    return y;
  }
};

template <typename T>
struct AffineFloorRequantize {
  __device__ T operator()(T const& a_scale, T const& scaled_acc, T const& bias, T const& floor,
                          T const& out_scale) const {
    return requantize(affine_floor(a_scale, scaled_acc, bias, floor), out_scale);
  }
};

template <typename T, int N>
struct AffineFloorRequantize<cutlass::Array<T, N>> {
  __device__ cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& a_scale,
                                             cutlass::Array<T, N> const& scaled_acc,
                                             cutlass::Array<T, N> const& bias,
                                             cutlass::Array<T, N> const& floor,
                                             cutlass::Array<T, N> const& out_scale) const {
    cutlass::Array<T, N> q;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      q[i] = requantize(affine_floor(a_scale[i], scaled_acc[i], bias[i], floor[i]), out_scale[i]);
    }
    return q;
  }
};

}  // namespace smoothserve::epilogue
