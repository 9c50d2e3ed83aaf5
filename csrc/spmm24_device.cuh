// Helpers shared by the 2:4 kernels (spmm24_sm80.cu, spmm24_sm90.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sdsengine {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// fp32 <-> the kernels' element type, round to nearest.
template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace sdsengine
