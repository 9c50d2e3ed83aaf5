// Decode-regime 2:4 sparse matmul with Ampere's mma.sp (m16n8k32), also compiled for Hopper.
//
// Yt = W . Xt: each warp owns one 16-row m-tile of W and walks a slice of K in 256-wide blocks. A block
// is 8 k-steps; per lane it is eight 16-byte value loads (one per k-step, already in A-fragment order)
// and one 16-byte metadata load (four registers, each serving two k-steps through the two sparsity
// selectors). The next two blocks are loaded into registers while the current one multiplies (a ring of
// three), so every warp keeps two blocks of weight bytes in flight. X is tiny in decode: the block's
// tokens x K-chunk are copied to shared memory with cp.async and turned into B fragments with ldmatrix;
// with two X buffers (the plan's x_buffers, an experiment) the next chunk's copies fly while this one multiplies.
//
// Grid: x = groups of kWarps m-tiles, y = K slices (split-K, so that decode with M = 4096 still puts
// several blocks on every SM), z = groups of 8 * n_tiles tokens (in a grouped call, per group of rows: each
// expert of a mixture its own weight and rows, spmm24.h). With more than one slice, every block
// writes its fp32 partial sums to a workspace and takes a ticket from its tile's counter; the last to
// arrive adds the slices in slice order (deterministic), writes Y and resets the counter to zero, so the
// counters stay zero between calls and no second kernel or memset is launched.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "spmm24.h"
#include "spmm24_device.cuh"

namespace sdsengine {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStepsPerBlock = 8;   // k-steps of 32 in one 256-wide K block
constexpr int kU4PerBlockRow = 32;  // 256 elements of one X row = 32 x 16 bytes
constexpr int kBlockRowBytes = kU4PerBlockRow * 16;
// What the split-K heuristic aims to keep resident per SM: what the registers allow at 128 threads (ptxas,
// sm_80 and sm_90a, with the three-block ring: 158-165 registers per thread up to 4 token tiles, 227-234 at 8).
constexpr int ctas_per_sm(int n_tiles) { return n_tiles >= 8 ? 2 : 3; }
constexpr int kSmemLimit = 48 * 1024;

// ordered_metadata is the form PTX recommends from ISA 8.5 on; our indices are sorted, which it needs.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SDS_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define SDS_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif


// Weights are read exactly once per call: keep them out of L1 so X and the fragments stay there.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` of this thread's committed groups of copies are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 b16 matrices: lane l names row l % 8 of matrix l / 8 and receives row l / 4, columns
// 2 * (l % 4) and + 1 of each, which is exactly the m16n8k32 B fragment (k = 2t + 8j, n = g).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint4* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}

template <typename T, int SEL>
struct MmaSp;

template <int SEL>
struct MmaSp<__half, SEL> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm volatile(SDS_MMA_SP "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(SEL));
  }
};

template <int SEL>
struct MmaSp<__nv_bfloat16, SEL> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
    asm volatile(SDS_MMA_SP "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(SEL));
  }
};

// One 16 x 256 block of W for one lane: the A registers of 8 k-steps and their metadata.
struct Block {
  uint4 a[kStepsPerBlock];
  uint4 e;
};

__device__ __forceinline__ void load_block(Block& blk, const uint4* values, const uint4* meta) {
#pragma unroll
  for (int s = 0; s < kStepsPerBlock; ++s) blk.a[s] = ld_stream(values + s * 32);
  blk.e = ld_stream(meta);
}

// Block kb of this warp's m-tile (values and meta point at the tile's first block, for this lane).
__device__ __forceinline__ void load_block_at(Block& blk, const uint4* values, const uint4* meta, int kb) {
  load_block(blk, values + static_cast<size_t>(kb) * kStepsPerBlock * 32, meta + kb * 32);
}

// Copies X[n0 : n0 + 8 NT, K blocks c0 : c1] to shared memory. Rows are padded by 16 bytes so the
// 8 row addresses of one ldmatrix fall in different bank groups. Rows from `end` on (past N, or another
// expert's) and K past the end (the zero padding of the reordered weight) read as zeros, so they add nothing
// and never NaN.
template <int NT>
__device__ __forceinline__ void stage_x(uint4* xs, const Spmm24Args& p, int n0, int end, int c0, int c1,
                                        int stride) {
  const int cols = (c1 - c0) * kU4PerBlockRow;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int i = threadIdx.x; i < NT * 8 * cols; i += kThreads) {
    const int r = i / cols;
    const int c = i - r * cols;
    const int n = n0 + r;
    const int k = (c0 * kU4PerBlockRow + c) * 8;
    uint4* dst = xs + r * stride + c;
    if (n < end && k < p.K) {
      cp_async16(dst, x + static_cast<size_t>(n) * p.K + k);
    } else {
      *dst = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Metadata word s / 2 holds k-step s for the lanes that selector s % 2 names (threads 0,1 or 2,3 of
// each quad), so one register feeds two MMAs.
template <typename T, int NT>
__device__ __forceinline__ void mma_block(float (&acc)[NT][4], const Block& blk, const uint4* xs, int stride,
                                          int lane) {
  const uint32_t words[4] = {blk.e.x, blk.e.y, blk.e.z, blk.e.w};
#pragma unroll
  for (int s = 0; s < kStepsPerBlock; ++s) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t b[4];
      ldmatrix_x4(b, xs + (j * 8 + (lane & 7)) * stride + s * 4 + (lane >> 3));
      if (s & 1) {
        MmaSp<T, 1>::run(acc[j], blk.a[s], b, words[s >> 1]);
      } else {
        MmaSp<T, 0>::run(acc[j], blk.a[s], b, words[s >> 1]);
      }
    }
  }
}

// Accumulator c[i] of n-tile j is Yt[m][n]: m = 16 mt + g + 8 (i / 2), n = n0 + 8 j + 2 t + i % 2.
template <typename T, int NT>
__device__ __forceinline__ void store(const float (&acc)[NT][4], const Spmm24Args& p, const T* bias, int mt, int n0,
                                      int end, int split, int lane) {
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = mt * 16 + (lane >> 2) + (i >> 1) * 8;
      const int n = n0 + j * 8 + (lane & 3) * 2 + (i & 1);
      if (m >= p.M || n >= end) continue;
      if (p.workspace != nullptr) {
        p.workspace[(static_cast<size_t>(split) * p.N + n) * p.M + m] = acc[j][i];
      } else {
        const float b = bias != nullptr ? Cvt<T>::to(bias[m]) : 0.f;
        y[static_cast<size_t>(n) * p.M + m] = Cvt<T>::from(acc[j][i] + b);
      }
    }
  }
}

// Called by every block of a split-K launch after its partial sums are stored. The fences order the
// partial-sum stores before the ticket, and the ticket before the last block's reads (the CUDA
// programming guide's threadFenceReduction pattern); __ldcg reads them from L2, past this SM's L1.
template <typename T, int NT>
__device__ __forceinline__ void reduce_if_last(const Spmm24Args& p, const T* bias, int n0, int end) {
  __shared__ int is_last;
  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + tile, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  T* y = static_cast<T*>(p.y);
  const int m0 = blockIdx.x * kWarps * 16;
  for (int i = threadIdx.x; i < NT * 8 * kWarps * 16; i += kThreads) {  // m fastest: coalesced
    const int n = n0 + i / (kWarps * 16);
    const int m = m0 + i % (kWarps * 16);
    if (n >= end || m >= p.M) continue;
    float sum = bias != nullptr ? Cvt<T>::to(bias[m]) : 0.f;
    for (int s = 0; s < static_cast<int>(gridDim.y); ++s) {
      sum += __ldcg(p.workspace + (static_cast<size_t>(s) * p.N + n) * p.M + m);
    }
    y[static_cast<size_t>(n) * p.M + m] = Cvt<T>::from(sum);
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;  // ready for the next call
}

// This block's rows of X, [n0, end), and their weight's index (0 but in a grouped call). False where the block
// has no rows: a group without an expert, or a token block past its expert's rows. Every split of a tile
// decides alike, so no split-K ticket of a tile is taken unless all of its splits take one.
template <int NT>
__device__ __forceinline__ bool block_rows(const Spmm24Args& p, int& n0, int& end, int& expert) {
  if (p.offsets == nullptr) {
    n0 = blockIdx.z * NT * 8;
    end = p.N;
    expert = 0;
    return true;
  }
  const int g = blockIdx.z / p.group_blocks;
  expert = p.groups[g];
  if (expert < 0) return false;
  n0 = p.offsets[expert] + (blockIdx.z - g * p.group_blocks) * NT * 8;
  end = min(p.offsets[expert + 1], p.N);  // offsets past x's rows read nothing past them
  return n0 < end;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads)
    spmm24_kernel(const Spmm24Args p, int kb_per_split, int kb_per_chunk, int x_buffers) {
  extern __shared__ uint4 xs[];
  int n0, end, expert;
  if (!block_rows<NT>(p, n0, end, expert)) return;  // the whole block, before any barrier
  const int lane = threadIdx.x & 31;
  const int mt = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const bool active = mt < p.Mt;  // idle warps still take part in the block's barriers
  const int split = blockIdx.y;
  const int kb_begin = split * kb_per_split;
  const int kb_end = min(p.KB, kb_begin + kb_per_split);
  const int stride = kb_per_chunk * kU4PerBlockRow + 1;

  const size_t tiles = static_cast<size_t>(expert) * p.Mt + (active ? mt : 0);  // m-tiles before this warp's
  const uint4* values = reinterpret_cast<const uint4*>(p.values) + tiles * p.KB * kStepsPerBlock * 32 + lane;
  const uint4* meta = reinterpret_cast<const uint4*>(p.meta) + tiles * p.KB * 32 + lane;
  const T* bias = p.bias != nullptr ? static_cast<const T*>(p.bias) + static_cast<size_t>(expert) * p.M : nullptr;
  float acc[NT][4] = {};
  // The ring: block kb sits in ring[(kb - kb_begin) % 3]. Each buffer keeps its registers (the switch below
  // names them statically): moving a block from one to another waits for its loads, which is how the
  // two-buffer form before kept only one block in flight (SASS: 36 SELs at the loop's end, 12-04).
  Block b0, b1, b2;
  if (active) {
    load_block_at(b0, values, meta, kb_begin);
    if (kb_begin + 1 < kb_end) load_block_at(b1, values, meta, kb_begin + 1);
  }
  int phase = 0;  // (kb - kb_begin) % 3 of the next block to multiply
  const int buffer = NT * 8 * stride;  // uint4s of one X buffer
  if (x_buffers == 2) {  // the first chunk now; every later one is staged while the one before it multiplies
    stage_x<NT>(xs, p, n0, end, kb_begin, min(kb_begin + kb_per_chunk, kb_end), stride);
    cp_async_commit();
  }

  for (int c0 = kb_begin, chunk = 0; c0 < kb_end; c0 += kb_per_chunk, ++chunk) {
    const int c1 = min(c0 + kb_per_chunk, kb_end);
    const uint4* xc = xs;
    if (x_buffers == 2) {
      xc = xs + (chunk & 1) * buffer;
      if (c1 < kb_end) {  // into the buffer the chunk before this one was read from (the barrier below)
        stage_x<NT>(xs + ((chunk + 1) & 1) * buffer, p, n0, end, c1, min(c1 + kb_per_chunk, kb_end), stride);
        cp_async_commit();
        cp_async_wait_group<1>();  // this chunk's copies have landed; the next chunk's may still be flying
      } else {
        cp_async_wait_group<0>();
      }
      __syncthreads();  // every thread's copies and zero fills of this chunk are visible
    } else {
      __syncthreads();  // the previous chunk is no longer read
      stage_x<NT>(xs, p, n0, end, c0, c1, stride);
      cp_async_wait_all();
      __syncthreads();
    }
    if (active) {
      for (int kb = c0; kb < c1; ++kb) {
        const uint4* x = xc + (kb - c0) * kU4PerBlockRow;
        const bool ahead = kb + 2 < kb_end;  // the block two ahead goes where this one's came from two ago
        switch (phase) {
          case 0:
            if (ahead) load_block_at(b2, values, meta, kb + 2);
            mma_block<T, NT>(acc, b0, x, stride, lane);
            break;
          case 1:
            if (ahead) load_block_at(b0, values, meta, kb + 2);
            mma_block<T, NT>(acc, b1, x, stride, lane);
            break;
          default:
            if (ahead) load_block_at(b1, values, meta, kb + 2);
            mma_block<T, NT>(acc, b2, x, stride, lane);
        }
        phase = phase == 2 ? 0 : phase + 1;
      }
    }
    if (x_buffers == 2) __syncthreads();  // the next iteration stages over the buffer read here
  }
  if (active) store<T, NT>(acc, p, bias, mt, n0, end, split, lane);
  if (p.workspace != nullptr) reduce_if_last<T, NT>(p, bias, n0, end);
}

template <typename T, int NT>
cudaError_t launch_typed(const Spmm24Args& args, const Spmm24Plan& plan, cudaStream_t stream) {
  Spmm24Args a = args;
  if (plan.splits == 1) a.workspace = nullptr;  // the kernel writes y itself, no tickets
  a.group_blocks = plan.token_blocks;
  const dim3 grid(plan.m_blocks, plan.splits, plan.token_blocks * plan.groups);
  spmm24_kernel<T, NT><<<grid, kThreads, plan.smem_bytes, stream>>>(a, plan.kb_per_split, plan.kb_per_chunk,
                                                                      plan.x_buffers);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tiles(const Spmm24Args& args, const Spmm24Plan& plan, cudaStream_t stream) {
  switch (plan.n_tiles) {
    case 1: return launch_typed<T, 1>(args, plan, stream);
    case 2: return launch_typed<T, 2>(args, plan, stream);
    case 4: return launch_typed<T, 4>(args, plan, stream);
    case 8: return launch_typed<T, 8>(args, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

Spmm24Plan spmm24_plan(int M, int N, int K, int num_sms, int split_k, int groups, int typical_rows, int x_buffers) {
  Spmm24Plan plan{};
  plan.groups = std::max(groups, 1);
  const int typical = typical_rows > 0 ? std::min(typical_rows, N) : N;
  plan.n_tiles = typical <= 8 ? 1 : typical <= 16 ? 2 : typical <= 32 ? 4 : 8;
  const int rows = plan.n_tiles * 8;
  const int kb = ceil_div(K, kStepsPerBlock * 32);
  plan.token_blocks = ceil_div(N, rows);
  plan.m_blocks = ceil_div(ceil_div(M, 16), kWarps);
  const int busy_blocks = plan.m_blocks * ceil_div(typical, rows) * plan.groups;
  // as many splits as fit in one wave of resident blocks (rounding up left a partial second wave: 11008x4096 at
  // one token, 172 m-blocks x 3 splits = 516 for 396 slots, where 2 splits fit)
  const int wanted = split_k > 0 ? split_k : ctas_per_sm(plan.n_tiles) * num_sms / std::max(busy_blocks, 1);
  plan.kb_per_split = ceil_div(kb, std::min(std::max(wanted, 1), kb));
  plan.splits = ceil_div(kb, plan.kb_per_split);
  // K blocks of X per buffer; two buffers share the limit, and are worth it only where a slice takes more than
  // one chunk (64 tokens: one block of X already takes more than half of it)
  const auto chunk_cap = [&](int buffers) { return (kSmemLimit / buffers / rows - 16) / kBlockRowBytes; };
  plan.x_buffers = x_buffers == 2 && chunk_cap(2) >= 1 && plan.kb_per_split > chunk_cap(2) ? 2 : 1;
  plan.kb_per_chunk = std::min(plan.kb_per_split, std::max(1, chunk_cap(plan.x_buffers)));
  plan.smem_bytes = plan.x_buffers * rows * (plan.kb_per_chunk * kBlockRowBytes + 16);
  return plan;
}

cudaError_t spmm24_launch(const Spmm24Args& args, const Spmm24Plan& plan, DType dtype, cudaStream_t stream) {
  if (plan.splits > 1 && (args.workspace == nullptr || args.counters == nullptr)) return cudaErrorInvalidValue;
  return dtype == DType::kHalf ? launch_tiles<__half>(args, plan, stream)
                               : launch_tiles<__nv_bfloat16>(args, plan, stream);
}

}  // namespace sdsengine
