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
// These are the pipelines where every thread loads (no producer warpgroup, no TMA); those with a TMA
// producer warpgroup are in spmm24_sm90_tma.cu, and the pieces both use in spmm24_sm90.cuh. OVERLAP picks
// between waiting for each stage's wgmmas before the next stage (false, the "plain" pipeline) and keeping
// one stage's wgmmas in flight while the next is issued (true; the stage loaded ahead is then one fewer,
// since its slot is read until the wait one stage later). Within a 256-column block ptxas gives consecutive
// stages' operands different registers (checked in the SASS by tests/sass_hazards.py); every wgmma is
// waited for before the next block reloads the metadata registers.
#include "spmm24_sm90.cuh"

namespace sdsengine {
namespace {

using namespace sm90;

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
  for (int i = threadIdx.x; i < TN * 8; i += kMmaThreads) {
    const int r = i >> 3, c = i & 7;
    const int n = n0 + r, k = s * kStageK + c * 8;
    const bool in = n < p.N && k < p.K;
    cp_async16(xs + r * 128 + ((c ^ (r & 7)) << 4), in ? x + static_cast<size_t>(n) * p.K + k : p.x, in ? 16 : 0);
  }
  const uint4* values = static_cast<const uint4*>(p.values);
  const uint32_t as = xs + TN * 128;
#pragma unroll
  for (int i = threadIdx.x; i < kMTiles * 64; i += kMmaThreads) {
    const int mt = mt0 + (i >> 6);
    const bool in = mt < p.Mt;
    const size_t at = a_offset(in ? mt : 0, p.KB, s) + (i & 63);
    cp_async16(as + i * 16, values + at, in ? 16 : 0);
  }
}

template <typename T, int TN, bool OVERLAP>
__global__ void __launch_bounds__(kMmaThreads, 1) spmm24_sm90_kernel(const Spmm24Args p) {
  constexpr int kAhead = OVERLAP ? kStages - 2 : kStages - 1;  // stages loaded ahead of the one computed
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = kernel_entry(smem_raw);
  constexpr int kStageBytes = stage_bytes(TN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mt0 = blockIdx.x * kMTiles, mt = mt0 + warp;
  const int n0 = blockIdx.y * TN;
  const int stages = p.KB * kStagesPerBlock;
  const MetaStream meta(p, mt, lane);
  uint4 e_next = meta.at(0);

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
    if (kb + 1 < p.KB) e_next = meta.at(kb + 1);
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
      mma_stage<T, TN>(acc, smem + (s % kStages) * kStageBytes, warp, lane, words[j]);
      wgmma_wait<OVERLAP ? 1 : 0>();
    }
    if (OVERLAP) wgmma_wait<0>();  // the next block reloads the metadata registers: nothing may be in flight
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
  static_assert(TN * 8 % kMmaThreads == 0 && kMTiles * 64 % kMmaThreads == 0, "loads divide evenly among threads");
  auto kernel = spmm24_sm90_kernel<T, TN, OVERLAP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(plan.m_blocks, plan.n_blocks), kMmaThreads, plan.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pipelined(const Spmm24Args& args, const Spmm24Sm90Plan& plan, cudaStream_t stream) {
  const bool overlap = plan.pipeline == static_cast<int>(Sm90Pipeline::kOverlap);
  return with_tile_n(plan.tile_n, [&](auto tn) {
    return overlap ? launch_typed<T, tn.value, true>(args, plan, stream)
                   : launch_typed<T, tn.value, false>(args, plan, stream);
  });
}

}  // namespace

Spmm24Sm90Plan spmm24_sm90_plan(int M, int N, int num_sms, int tile_n, Sm90Pipeline pipeline) {
  Spmm24Sm90Plan plan{};
  plan.pipeline = static_cast<int>(pipeline);
  plan.cluster = pipeline == Sm90Pipeline::kTmaMulticast ? 2 : 1;
  plan.m_blocks = ceil_div(ceil_div(ceil_div(M, 16), kMTiles), plan.cluster) * plan.cluster;
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
  plan.smem_bytes = smem_bytes(plan.tile_n, pipeline >= Sm90Pipeline::kTma);
  return plan;
}

cudaError_t spmm24_sm90_launch(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype, cudaStream_t stream) {
  if (plan.pipeline >= static_cast<int>(Sm90Pipeline::kTma)) return spmm24_sm90_tma_launch(args, plan, dtype, stream);
  return dtype == DType::kHalf ? launch_pipelined<__half>(args, plan, stream)
                               : launch_pipelined<__nv_bfloat16>(args, plan, stream);
}

cudaError_t spmm24_sm90_present(int* flag, cudaStream_t stream) {
  sm90a_present_kernel<<<1, 1, 0, stream>>>(flag);
  return cudaGetLastError();
}

}  // namespace sdsengine
