// The pieces both Hopper pipelines share (spmm24_sm90.cu: every thread loads with cp.async;
// spmm24_sm90_tma.cu: a TMA producer warpgroup): the block's shape, the stage layout, the wgmma.sp
// instructions that read it, and the epilogue. A stage is the X tile (TN rows of 128 bytes, 128-byte swizzled,
// read by wgmma through a matrix descriptor) followed by the block's A fragments for its two k-steps, in the
// order warps read them (m-tile, k-step, lane), copied verbatim from the reordered weight.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "spmm24.h"
#include "spmm24_device.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SDS_SM90A 1
#endif

namespace sdsengine {
namespace sm90 {

constexpr int kMmaWarpgroups = 2;                  // warpgroups that run wgmma: 128 rows of W per block
constexpr int kMmaThreads = kMmaWarpgroups * 128;
constexpr int kMTiles = kMmaWarpgroups * 4;        // 16-row m-tiles per block: one per MMA warp
constexpr int kStageK = 64;                         // K columns per stage: one 128-byte swizzled X row
constexpr int kStagesPerBlock = 256 / kStageK;      // stages per 256-column block of the reordered layout
constexpr int kStages = 4;                          // stages in flight
constexpr int kAStageBytes = kMTiles * 2 * 32 * 16;  // two k-steps of every warp's A fragments
constexpr int kAlign = 1024;                        // 128-byte swizzle repeats every 8 rows of 128 bytes
constexpr uint32_t kPadMeta = 0x44444444u;          // valid, ordered metadata for the zero rows past M

__host__ __device__ constexpr int stage_bytes(int tile_n) { return tile_n * 128 + kAStageBytes; }
constexpr int kBarrierBytes = 2 * kStages * 8;      // the TMA pipeline's full and empty mbarriers per stage

// Dynamic shared memory of a block: the stages, their alignment slack and, with TMA, the barriers after them.
__host__ __device__ constexpr int smem_bytes(int tile_n, bool tma) {
  return kAlign + kStages * stage_bytes(tile_n) + (tma ? kBarrierBytes : 0);
}

// f(std::integral_constant<int, TN>{}) for the plan's tile width: one instantiation per width.
template <typename F>
inline cudaError_t with_tile_n(int tile_n, F&& f) {
  switch (tile_n) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return cudaErrorInvalidValue;
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The element offset of m-tile mt's A fragments for stage s in the reordered values, in 16-byte units:
// both k-steps of a stage (64 lanes x 16 bytes) are contiguous there.
__host__ __device__ constexpr size_t a_offset(int mt, int KB, int s) {
  return (static_cast<size_t>(mt) * KB * 8 + 2 * s) * 32;
}

// Kernels start here: an image without sm_90a code traps (the host refuses to launch one before that:
// spmm24_sm90_present), and the dynamic shared memory is aligned for the 128-byte swizzle.
__device__ __forceinline__ uint8_t* kernel_entry(uint8_t* smem_raw) {
#if defined(__CUDA_ARCH__) && !defined(SDS_SM90A)
  asm volatile("trap;");
#endif
  return smem_raw + (-smem_addr(smem_raw) & (kAlign - 1));
}

// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: start address, leading byte
// offset (unused by this mode, 16), stride byte offset 1024 (from one 8-row group to the next), mode 1.
__device__ __forceinline__ uint64_t b_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// The async-proxy instructions below exist only for sm_90a; other images keep the code around them (so it
// is compiled and checked everywhere) and trap on entry instead.
#if defined(SDS_SM90A)
#define SDS_ASYNC(text) asm volatile(text ::: "memory")
#else
#define SDS_ASYNC(text)
#endif
__device__ __forceinline__ void wgmma_fence() { SDS_ASYNC("wgmma.fence.sync.aligned;\n"); }
__device__ __forceinline__ void wgmma_commit() { SDS_ASYNC("wgmma.commit_group.sync.aligned;\n"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(SDS_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() { SDS_ASYNC("fence.proxy.async.shared::cta;\n"); }

// wgmma.sp m64nTNk32, A from registers, B (TN x 32 of X) from shared memory, fp32 accumulators in place.
// Accumulator 4i + q is Yt[16 w + g + 8 (q / 2)][8 i + 2 t + q % 2] for lane 4g + t of warp w.
#define SDS_F8(d, i)                                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define SDS_F32(d, i) SDS_F8(d, i), SDS_F8(d, i + 8), SDS_F8(d, i + 16), SDS_F8(d, i + 24)
#define SDS_F64(d, i) SDS_F32(d, i), SDS_F32(d, i + 32)
#define SDS_F128(d, i) SDS_F64(d, i), SDS_F64(d, i + 64)
#define SDS_IN(a, desc, e, sel) "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(e), "n"(sel)

#define SDS_D64                                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define SDS_D128                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define SDS_D256                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "   \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "   \
  "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, "  \
  "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "      \
  "%123, %124, %125, %126, %127}, "
// a, b-desc, sp-meta, sp-sel, scale-d (accumulate), scale-a, scale-b, trans-b (0: X rows are K-major)
#define SDS_A64 "{%32, %33, %34, %35}, %36, %37, %38, 1, 1, 1, 0;\n"
#define SDS_A128 "{%64, %65, %66, %67}, %68, %69, %70, 1, 1, 1, 0;\n"
#define SDS_A256 "{%128, %129, %130, %131}, %132, %133, %134, 1, 1, 1, 0;\n"
#define SDS_OP(n, ty) "wgmma.mma_async.sp.sync.aligned.m64n" #n "k32.f32." ty "." ty " "

template <typename T, int TN, int SEL>
__device__ __forceinline__ void wgmma_sp(float (&d)[TN / 2], const uint4& a, uint64_t desc, uint32_t e) {
#if defined(SDS_SM90A)
  if constexpr (TN == 64) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(SDS_OP(64, "f16") SDS_D64 SDS_A64 : SDS_F32(d, 0) : SDS_IN(a, desc, e, SEL));
    } else {
      asm volatile(SDS_OP(64, "bf16") SDS_D64 SDS_A64 : SDS_F32(d, 0) : SDS_IN(a, desc, e, SEL));
    }
  } else if constexpr (TN == 128) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(SDS_OP(128, "f16") SDS_D128 SDS_A128 : SDS_F64(d, 0) : SDS_IN(a, desc, e, SEL));
    } else {
      asm volatile(SDS_OP(128, "bf16") SDS_D128 SDS_A128 : SDS_F64(d, 0) : SDS_IN(a, desc, e, SEL));
    }
  } else {
    static_assert(TN == 256, "tile_n is 64, 128 or 256");
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(SDS_OP(256, "f16") SDS_D256 SDS_A256 : SDS_F128(d, 0) : SDS_IN(a, desc, e, SEL));
    } else {
      asm volatile(SDS_OP(256, "bf16") SDS_D256 SDS_A256 : SDS_F128(d, 0) : SDS_IN(a, desc, e, SEL));
    }
  }
#endif
}

template <typename T, int TN>
__device__ __forceinline__ void store(const float (&acc)[TN / 2], const Spmm24Args& p, int mt, int n0, int lane) {
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = mt * 16 + g + 8 * h;
    if (m >= p.M) continue;
    const float b = bias != nullptr ? Cvt<T>::to(bias[m]) : 0.f;
#pragma unroll
    for (int i = 0; i < TN / 8; ++i) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int n = n0 + 8 * i + 2 * t + c;
        if (n < p.N) y[static_cast<size_t>(n) * p.M + m] = Cvt<T>::from(acc[4 * i + 2 * h + c] + b);
      }
    }
  }
}

// One stage's two k-steps for this warp's m-tile (warp: 0..7 among the MMA warps), issued and committed as
// one wgmma group; the caller decides when to wait for it. Until then the group may still read the A
// fragment registers (and the metadata word), so the caller must not let ptxas reuse them: the pipelines
// either wait before the next stage's operands are loaded, or rely on ptxas keeping them apart, which
// tests/sass_hazards.py checks in the compiled code.
template <typename T, int TN>
__device__ __forceinline__ void mma_stage(float (&acc)[TN / 2], const uint8_t* stage, int warp, int lane,
                                          uint32_t word) {
  const uint4* a = reinterpret_cast<const uint4*>(stage + TN * 128) + warp * 64 + lane;
  const uint4 a0 = a[0], a1 = a[32];
  const uint32_t xs = smem_addr(stage);
  wgmma_fence();
  wgmma_sp<T, TN, 0>(acc, a0, b_desc(xs), word);       // k-step 2j: metadata word j, selector 0
  wgmma_sp<T, TN, 1>(acc, a1, b_desc(xs + 64), word);  // k-step 2j + 1: same word, selector 1
  wgmma_commit();
}

// This lane's metadata for m-tile mt, one 16-byte load per 256-column block; rows past M read valid padding.
struct MetaStream {
  const uint4* row;
  bool in;
  __device__ __forceinline__ MetaStream(const Spmm24Args& p, int mt, int lane)
      : row(reinterpret_cast<const uint4*>(p.meta) + static_cast<size_t>(min(mt, p.Mt - 1)) * p.KB * 32 + lane),
        in(mt < p.Mt) {}
  __device__ __forceinline__ uint4 at(int kb) const {
    return in ? row[kb * 32] : make_uint4(kPadMeta, kPadMeta, kPadMeta, kPadMeta);
  }
  // Stage s's word alone (word s % 4 of block s / 4): 4 registers fewer than holding a block's four.
  __device__ __forceinline__ uint32_t word(int s) const {
    return in ? reinterpret_cast<const uint32_t*>(row + (s / kStagesPerBlock) * 32)[s % kStagesPerBlock] : kPadMeta;
  }
};

}  // namespace sm90
}  // namespace sdsengine
