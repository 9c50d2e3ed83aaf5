// The Hopper prefill kernel's TMA pipeline (sm_90a code only; other targets compile a stub).
//
// Same product, weight layout, block shape (two MMA warpgroups, 128 rows of W, by TN tokens) and stage
// layout as spmm24_sm90.cu (shared in spmm24_sm90.cuh), loaded differently: a third warpgroup is the
// producer. One of its threads fills each stage with the tensor memory accelerator (the X tile through a
// tensor map that swizzles it as the wgmma descriptor expects, zero-filling tokens past N and columns past
// K; the A fragments with bulk copies) and an mbarrier counts the bytes in ("full"). The MMA warps wait on
// it, issue the stage's wgmmas, wait for them and release the stage ("empty"), so the producer can refill it
// while they go on with the next; the two MMA warpgroups' wgmmas interleave on the tensor cores. The MMA
// warps do no address arithmetic for loads, and the producer gives up registers to them (setmaxnreg).
//
// With CLUSTER = 2 (pipeline kTmaMulticast), the blocks of a cluster share n0 and take neighbouring 128-row
// slices of W: each loads half of the X tile and multicasts it into both, which halves the X traffic out of
// L2 that bounds a 128 x 256 tile. A stage is then refilled only when the MMA warps of both blocks have
// released it, so the empty barrier counts the arrivals of both; the blocks meet at a cluster barrier before
// any copy (barriers initialised) and before leaving (no arrival left to reach a block that has exited).
//
// Not yet run on a GPU: a wait that never completes traps after about a second (kHangCycles) instead of
// hanging the process, so a wrong byte count fails loudly.
#include <cuda.h>
#include <cudaTypedefs.h>

#include "spmm24_sm90.cuh"

namespace sdsengine {
namespace {

using namespace sm90;

constexpr int kThreads = kMmaThreads + 128;  // warpgroup 0 produces, warpgroups 1 and 2 multiply
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr long long kHangCycles = 1ll << 36;  // about 35 s at Hopper's clocks: past any healthy wait, even
                                             // a time-sliced one, and before the self-check child's timeout

// mbarrier and TMA instructions exist from sm_90 on, setmaxnreg from sm_90a; like the wgmmas, they are
// emitted only in the sm_90a image (the others trap on entry), while the code around them compiles for all.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(SDS_SM90A)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(SDS_SM90A)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 1;
#if defined(SDS_SM90A)
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
#endif
  return done != 0;
}

// Until the phase of the given parity has completed; traps past kHangCycles (a wrong count never completes).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const long long start = clock64();
  while (!mbar_try_wait(bar, parity)) {
    if (clock64() - start > kHangCycles) asm volatile("trap;");
  }
}

// One arrival on the barrier at this CTA-relative address in block `cta` of the cluster (this one included).
// The default (CTA-scope) release, as CUTLASS's cluster barrier uses: what it publishes is that wgmmas already
// waited for have read the stage. A .release.cluster arrive compiles to GPU-wide fences before every arrival.
template <int CLUSTER>
__device__ __forceinline__ void mbar_arrive(uint32_t bar, uint32_t cta) {
#if defined(SDS_SM90A)
  if constexpr (CLUSTER == 1) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
  } else {
    asm volatile("{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
                 "r"(cta)
                 : "memory");
  }
#endif
}

__device__ __forceinline__ void fence_barrier_init() { SDS_ASYNC("fence.mbarrier_init.release.cluster;\n"); }
__device__ __forceinline__ void cluster_sync() { SDS_ASYNC("barrier.cluster.arrive;\nbarrier.cluster.wait;\n"); }

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
#if defined(SDS_SM90A)
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
  return rank;
}

// X[n : n + rows, k : k + 64] through the tensor map into shared memory at dst, counted on bar; with
// CLUSTER = 2 into the same offset of both blocks, each counting it on its own barrier at bar's offset.
template <int CLUSTER>
__device__ __forceinline__ void tma_load_x(uint32_t dst, const CUtensorMap* map, uint32_t bar, int k, int n) {
#if defined(SDS_SM90A)
  const uint64_t desc = reinterpret_cast<uint64_t>(map);
  if constexpr (CLUSTER == 1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
            "r"(dst),
        "l"(desc), "r"(k), "r"(n), "r"(bar)
        : "memory");
  } else {
    const uint16_t mask = (1u << CLUSTER) - 1;
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(desc), "r"(k), "r"(n), "r"(bar), "h"(mask)
        : "memory");
  }
#endif
}

// `bytes` contiguous bytes from global src into shared memory at dst, counted on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(SDS_SM90A)
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
#endif
}

template <bool INCREASE, int REGS>
__device__ __forceinline__ void set_max_registers() {
#if defined(SDS_SM90A)
  if constexpr (INCREASE) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
  }
#endif
}

// The barriers after the stages: kStages "full" ones, then kStages "empty" ones, 8 bytes each.
struct Barriers {
  uint32_t base;
  __device__ __forceinline__ uint32_t full_at(int slot) const { return base + 8 * slot; }
  __device__ __forceinline__ uint32_t empty_at(int slot) const { return base + 8 * (kStages + slot); }
};

// The producer thread: every stage of the block, each once its slot is free in every block of the cluster.
template <int TN, int CLUSTER>
__device__ __forceinline__ void produce(const CUtensorMap* xmap, const Spmm24Args& p, uint32_t stages_at,
                                        const Barriers& bars, int mt0, int n0, uint32_t rank) {
  constexpr int kRows = TN / CLUSTER;  // X rows this block loads for the whole cluster
  const int a_tiles = max(0, min(kMTiles, p.Mt - mt0));  // m-tiles past M are not loaded (their rows unstored)
  const uint32_t bytes = TN * 128 + a_tiles * 1024;      // all of X (both halves with CLUSTER = 2) and our A
  const uint4* values = static_cast<const uint4*>(p.values);
  const int stages = p.KB * kStagesPerBlock;
  for (int s = 0; s < stages; ++s) {
    const int slot = s % kStages;
    mbar_wait(bars.empty_at(slot), ((s / kStages) & 1) ^ 1);  // a fresh barrier counts as released
    const uint32_t stage = stages_at + slot * stage_bytes(TN);
    mbar_expect_tx(bars.full_at(slot), bytes);
    tma_load_x<CLUSTER>(stage + rank * kRows * 128, xmap, bars.full_at(slot), s * kStageK, n0 + rank * kRows);
    for (int m = 0; m < a_tiles; ++m) {
      bulk_load(stage + TN * 128 + m * 1024, values + a_offset(mt0 + m, p.KB, s), 1024, bars.full_at(slot));
    }
  }
}

// Stage s's slot, free again once its wgmmas are done: one arrival per MMA warp on each block's empty barrier.
template <int CLUSTER>
__device__ __forceinline__ void release(const Barriers& bars, int s, int lane) {
  if (lane != 0) return;
#pragma unroll
  for (uint32_t cta = 0; cta < CLUSTER; ++cta) mbar_arrive<CLUSTER>(bars.empty_at(s % kStages), cta);
}

// An MMA warp: its m-tile's wgmmas stage by stage, then the epilogue.
template <typename T, int TN, int CLUSTER>
__device__ __forceinline__ void consume(const Spmm24Args& p, const uint8_t* smem, const Barriers& bars, int mt0,
                                        int n0) {
  const int warp = (threadIdx.x - 128) >> 5, lane = threadIdx.x & 31;
  const int mt = mt0 + warp;
  const MetaStream meta(p, mt, lane);
  float acc[TN / 2];
#pragma unroll
  for (int i = 0; i < TN / 2; ++i) acc[i] = 0.f;
  // Each stage is waited for before the next one's operands are loaded, so no register an in-flight wgmma
  // reads can be reused; the other MMA warpgroup's wgmmas keep the tensor cores busy meanwhile. (Leaving a
  // stage in flight would need a second set of operands, which at TN = 256 does not fit beside the 128
  // accumulators in the 168 registers per thread that 384 threads leave: ptxas then waits after every wgmma.)
  const int stages = p.KB * kStagesPerBlock;
  uint32_t word = meta.word(0);  // loaded a stage ahead, one word at a time (registers are short at TN = 256)
  for (int s = 0; s < stages; ++s) {
    const uint32_t now = word;
    if (s + 1 < stages) word = meta.word(s + 1);
    mbar_wait(bars.full_at(s % kStages), (s / kStages) & 1);
    mma_stage<T, TN>(acc, smem + (s % kStages) * stage_bytes(TN), warp, lane, now);
    wgmma_wait<0>();
    release<CLUSTER>(bars, s, lane);
  }
  if (mt < p.Mt) store<T, TN>(acc, p, mt, n0, lane);
}

template <typename T, int TN, int CLUSTER>
__global__ void __launch_bounds__(kThreads, 1) spmm24_sm90_tma_kernel(const __grid_constant__ CUtensorMap xmap,
                                                                      const Spmm24Args p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = kernel_entry(smem_raw);
  const uint32_t stages_at = smem_addr(smem);
  const Barriers bars{stages_at + kStages * stage_bytes(TN)};
  const int mt0 = blockIdx.x * kMTiles, n0 = blockIdx.y * TN;
  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kStages; ++slot) {
      mbar_init(bars.full_at(slot), 1);  // the producer's expect_tx; the bytes complete it
      mbar_init(bars.empty_at(slot), kMmaWarps * CLUSTER);
    }
    fence_barrier_init();
  }
  if constexpr (CLUSTER > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  if (threadIdx.x < 128) {
    set_max_registers<false, 40>();  // 40 x 128 + 232 x 256 registers fit the SM's 64K
    if (threadIdx.x == 0) produce<TN, CLUSTER>(&xmap, p, stages_at, bars, mt0, n0, CLUSTER > 1 ? cluster_rank() : 0);
  } else {
    set_max_registers<true, 232>();
    consume<T, TN, CLUSTER>(p, smem, bars, mt0, n0);
  }
  if constexpr (CLUSTER > 1) cluster_sync();
}

// cuTensorMapEncodeTiled from the driver, looked up once (the extension does not link libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* found = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &found, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &found, cudaEnableDefault, &status);
#endif
    return err == cudaSuccess && status == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(found)
               : nullptr;
  }();
  return fn;
}

// X (N, K) as 64-column by `rows`-token boxes, 128-byte swizzled, zeros outside (tokens past N, columns past K).
cudaError_t x_tensor_map(CUtensorMap* map, const Spmm24Args& args, DType dtype, int rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(args.K), static_cast<cuuint64_t>(args.N)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(args.K) * 2};  // bytes from one token to the next
  const cuuint32_t box[2] = {kStageK, static_cast<cuuint32_t>(rows)};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult result = encode(
      map, dtype == DType::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
      const_cast<void*>(args.x), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int TN, int CLUSTER>
cudaError_t launch_typed(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype, cudaStream_t stream) {
  auto kernel = spmm24_sm90_tma_kernel<T, TN, CLUSTER>;
  CUtensorMap map;
  cudaError_t err = x_tensor_map(&map, args, dtype, TN / CLUSTER);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes);
  }
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = CLUSTER;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(plan.m_blocks, plan.n_blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = plan.smem_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, map, args);
}

template <typename T>
cudaError_t launch_clustered(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype, cudaStream_t stream) {
  return with_tile_n(plan.tile_n, [&](auto tn) {
    return plan.cluster == 2 ? launch_typed<T, tn.value, 2>(args, plan, dtype, stream)
                             : launch_typed<T, tn.value, 1>(args, plan, dtype, stream);
  });
}

}  // namespace

cudaError_t spmm24_sm90_tma_launch(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype,
                                   cudaStream_t stream) {
  return dtype == DType::kHalf ? launch_clustered<__half>(args, plan, dtype, stream)
                               : launch_clustered<__nv_bfloat16>(args, plan, dtype, stream);
}

}  // namespace sdsengine
