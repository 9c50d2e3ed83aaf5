// Prefill-regime 2:4 sparse matmul for Hopper with wgmma.sp (sm_90a code only; other targets compile a stub).
//
// Yt = W . Xt as in spmm24_sm80.cu, on the same reordered weight (sdsengine.ops.reorder_24): per warp the
// A fragment and metadata of wgmma.sp m64nNk32 are those of mma.sp m16n8k32, so warp w of a warpgroup
// feeds rows 16w..16w+15 of the instruction's 64 from m-tile w of the block, exactly as the decode kernel
// does. A block is two warpgroups (128 rows of W) by TN tokens (N of the instruction). K advances in
// stages of 64: each stage holds the X tile (TN rows of 128 bytes, 128-byte swizzled, the B operand read
// through a matrix descriptor) and the block's A fragments for the stage's two k-steps (copied verbatim
// from the reordered layout); kStages stages are in flight with cp.async. Metadata, one 16-byte load per
// lane per 256 columns, comes straight from global memory one 256-column block ahead.
//
// This is a first, deliberately plain pipeline (every thread loads; no producer/consumer warpgroups, no
// TMA): correctness on hardware comes first. OVERLAP picks between waiting for each stage's wgmmas before
// the next stage (false) and keeping one stage's wgmmas in flight while the next is issued (true; the
// stage loaded ahead is then one fewer, since its slot is read until the wait one stage later). ptxas gives
// consecutive stages' A fragments different registers, so the register operands stay intact meanwhile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "spmm24.h"
#include "spmm24_device.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SDS_SM90A 1
#endif

namespace sdsengine {
namespace {

constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kMTiles = kWarpgroups * 4;           // 16-row m-tiles per block: one per warp
constexpr int kStageK = 64;                         // K columns per stage: one 128-byte swizzled X row
constexpr int kStagesPerBlock = 256 / kStageK;      // stages per 256-column block of the reordered layout
constexpr int kStages = 4;                          // stages in flight
constexpr int kAStageBytes = kMTiles * 2 * 32 * 16;  // two k-steps of every warp's A fragments
constexpr int kAlign = 1024;                        // 128-byte swizzle repeats every 8 rows of 128 bytes
constexpr uint32_t kPadMeta = 0x44444444u;          // valid, ordered metadata for the zero rows past M

__host__ __device__ constexpr int stage_bytes(int tile_n) { return tile_n * 128 + kAStageBytes; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes, or 16 zeros when src_bytes is 0 (tokens past N, columns past K, rows past M).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Stage s of the block's tiles: X[n0 : n0 + TN, 64 s : 64 s + 64] with 16-byte chunk c of row r at chunk
// c ^ (r % 8) (the 128-byte swizzle the descriptor names), then the A fragments of k-steps 2s and 2s + 1
// for each of the block's m-tiles, in the order warps read them (m-tile, k-step, lane).
template <int TN>
__device__ __forceinline__ void load_stage(uint8_t* stage, const Spmm24Args& p, int mt0, int n0, int s) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint32_t xs = smem_addr(stage);
#pragma unroll
  for (int i = threadIdx.x; i < TN * 8; i += kThreads) {
    const int r = i >> 3, c = i & 7;
    const int n = n0 + r, k = s * kStageK + c * 8;
    const bool in = n < p.N && k < p.K;
    cp_async16(xs + r * 128 + ((c ^ (r & 7)) << 4), in ? x + static_cast<size_t>(n) * p.K + k : p.x, in ? 16 : 0);
  }
  const uint4* values = static_cast<const uint4*>(p.values);
  const uint32_t as = xs + TN * 128;
#pragma unroll
  for (int i = threadIdx.x; i < kMTiles * 64; i += kThreads) {
    const int mt = mt0 + (i >> 6);
    const bool in = mt < p.Mt;
    const size_t at = (static_cast<size_t>(in ? mt : 0) * p.KB * 8 + 2 * s) * 32 + (i & 63);
    cp_async16(as + i * 16, values + at, in ? 16 : 0);
  }
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

template <typename T, int TN, bool OVERLAP>
__global__ void __launch_bounds__(kThreads, 1) spmm24_sm90_kernel(const Spmm24Args p) {
  constexpr int kAhead = OVERLAP ? kStages - 2 : kStages - 1;  // stages loaded ahead of the one computed
#if defined(__CUDA_ARCH__) && !defined(SDS_SM90A)
  asm volatile("trap;");  // an image without sm_90a code: the host refuses to launch (spmm24_sm90_present)
#endif
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + (-smem_addr(smem_raw) & (kAlign - 1));
  constexpr int kStageBytes = stage_bytes(TN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mt0 = blockIdx.x * kMTiles, mt = mt0 + warp;
  const int n0 = blockIdx.y * TN;
  const int stages = p.KB * kStagesPerBlock;
  const uint4* meta =
      reinterpret_cast<const uint4*>(p.meta) + static_cast<size_t>(min(mt, p.Mt - 1)) * p.KB * 32 + lane;
  const uint4 pad = make_uint4(kPadMeta, kPadMeta, kPadMeta, kPadMeta);
  uint4 e_next = mt < p.Mt ? meta[0] : pad;

  float acc[TN / 2];
#pragma unroll
  for (int i = 0; i < TN / 2; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < stages) load_stage<TN>(smem + s * kStageBytes, p, mt0, n0, s);
    cp_async_commit();
  }
  for (int kb = 0; kb < p.KB; ++kb) {
    const uint4 e = e_next;
    if (kb + 1 < p.KB && mt < p.Mt) e_next = meta[(kb + 1) * 32];
    const uint32_t words[4] = {e.x, e.y, e.z, e.w};
#pragma unroll
    for (int j = 0; j < kStagesPerBlock; ++j) {
      const int s = kb * kStagesPerBlock + j;
      cp_async_wait<kAhead - 1>();                                    // stage s has landed (this thread's part)
      fence_proxy_async();                                            // visible to the tensor cores' reads
      __syncthreads();                                                // everyone's part; the slot below is free
      const int ahead = s + kAhead;
      if (ahead < stages) load_stage<TN>(smem + (ahead % kStages) * kStageBytes, p, mt0, n0, ahead);
      cp_async_commit();
      uint8_t* stage = smem + (s % kStages) * kStageBytes;
      const uint4* a = reinterpret_cast<const uint4*>(stage + TN * 128) + warp * 64 + lane;
      const uint4 a0 = a[0], a1 = a[32];
      const uint32_t xs = smem_addr(stage);
      wgmma_fence();
      wgmma_sp<T, TN, 0>(acc, a0, b_desc(xs), words[j]);       // k-step 2j: metadata word j, selector 0
      wgmma_sp<T, TN, 1>(acc, a1, b_desc(xs + 64), words[j]);  // k-step 2j + 1: same word, selector 1
      wgmma_commit();
      wgmma_wait<OVERLAP ? 1 : 0>();
    }
  }
  wgmma_wait<0>();
  if (mt < p.Mt) store<T, TN>(acc, p, mt, n0, lane);
}

__global__ void sm90a_present_kernel(int* out) {
#if defined(SDS_SM90A)
  *out = 1;
#else
  *out = 0;
#endif
}

template <typename T, int TN, bool OVERLAP>
cudaError_t launch_typed(const Spmm24Args& args, const Spmm24Sm90Plan& plan, cudaStream_t stream) {
  static_assert(TN * 8 % kThreads == 0 && kMTiles * 64 % kThreads == 0, "loads divide evenly among threads");
  auto kernel = spmm24_sm90_kernel<T, TN, OVERLAP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(plan.m_blocks, plan.n_blocks), kThreads, plan.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, bool OVERLAP>
cudaError_t launch_tiles(const Spmm24Args& args, const Spmm24Sm90Plan& plan, cudaStream_t stream) {
  switch (plan.tile_n) {
    case 64: return launch_typed<T, 64, OVERLAP>(args, plan, stream);
    case 128: return launch_typed<T, 128, OVERLAP>(args, plan, stream);
    case 256: return launch_typed<T, 256, OVERLAP>(args, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_pipelined(const Spmm24Args& args, const Spmm24Sm90Plan& plan, cudaStream_t stream) {
  return plan.overlap ? launch_tiles<T, true>(args, plan, stream) : launch_tiles<T, false>(args, plan, stream);
}

}  // namespace

Spmm24Sm90Plan spmm24_sm90_plan(int M, int N, int num_sms, int tile_n, bool overlap) {
  Spmm24Sm90Plan plan{};
  plan.overlap = overlap ? 1 : 0;
  plan.m_blocks = ceil_div(ceil_div(M, 16), kMTiles);
  plan.tile_n = tile_n;
  if (tile_n == 0) {  // the widest tile that still gives every SM a block; the narrowest when none does
    plan.tile_n = 64;
    for (int tn : {256, 128}) {
      if (plan.m_blocks * ceil_div(N, tn) >= num_sms) {
        plan.tile_n = tn;
        break;
      }
    }
  }
  plan.n_blocks = ceil_div(N, plan.tile_n);
  plan.stages = kStages;
  plan.smem_bytes = kStages * stage_bytes(plan.tile_n) + kAlign;
  return plan;
}

cudaError_t spmm24_sm90_launch(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype, cudaStream_t stream) {
  return dtype == DType::kHalf ? launch_pipelined<__half>(args, plan, stream)
                               : launch_pipelined<__nv_bfloat16>(args, plan, stream);
}

cudaError_t spmm24_sm90_present(int* present, cudaStream_t stream) {
  int* flag = nullptr;
  cudaError_t err = cudaMallocAsync(&flag, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  sm90a_present_kernel<<<1, 1, 0, stream>>>(flag);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpyAsync(present, flag, sizeof(int), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  const cudaError_t freed = cudaFreeAsync(flag, stream);
  return err != cudaSuccess ? err : freed;
}

}  // namespace sdsengine
