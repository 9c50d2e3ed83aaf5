// 2:4 sparse x dense matmul on sparse tensor cores: Y[N, M] = X[N, K] . W[M, K]^T (+ bias).
//
// W enters as the sparse A operand of mma.sp and X^T as B, so tokens are the N dimension of the
// instruction (granularity 8) and decode needs no padding to 16 rows. W must already be in the fragment
// order written by sdsengine.ops.reorder_24 (an offline step from the canonical compress_24 layout):
//   values  [Mt][KB * 8][32 lanes][8 elements]  one 16-byte load per lane per 16x32 tile
//   meta    [Mt][KB][32 lanes][4 words]          one 16-byte load per lane per 16x256 block
// with Mt = ceil(M / 16) and KB = ceil(K / 256). This header is free of torch so the kernels compile alone.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sdsengine {

enum class DType { kHalf, kBFloat16 };

// How one call is cut into thread blocks; computed on the host, also reported to Python for tests.
struct Spmm24Plan {
  int n_tiles;       // 8-token MMA tiles per warp: 1, 2, 4 or 8
  int token_blocks;  // blocks of n_tiles * 8 tokens (per group in a grouped call); grid.z = token_blocks * groups
  int groups;        // 1, or a grouped call's groups (spmm24_grouped below)
  int m_blocks;      // grid.x: blocks of kWarps m-tiles of 16 rows
  int splits;        // grid.y: K is cut into this many slices (1: no workspace)
  int kb_per_split;  // 256-wide K blocks per slice
  int kb_per_chunk;  // K blocks of X staged in shared memory at a time
  int x_buffers;     // 1: each chunk of X is staged, then multiplied; 2: staged while the one before multiplies
  int smem_bytes;
};

struct Spmm24Args {
  const void* x;         // [N, K], 16-byte aligned
  const void* values;    // reordered values, dtype of x
  const int32_t* meta;   // reordered metadata
  const void* bias;      // [M] or nullptr
  void* y;               // [N, M]
  float* workspace;      // [splits, N, M] fp32 partial sums; used only when splits > 1
  int* counters;         // [m_blocks * token_blocks] zeros, left zero again; used only when splits > 1
  int M, N, K, Mt, KB;
  // A grouped call (one launch for the experts of a mixture): x's rows are grouped by expert, and values, meta
  // and bias hold one weight per expert, [E][...] of the shapes above. Block z serves group z / group_blocks:
  // expert groups[g] (-1: none), the rows offsets[e] .. offsets[e + 1] of x (at most N), token block
  // z % group_blocks of them. Both arrays live on the device, so the launch needs nothing from the host that
  // depends on the routing, and CUDA graphs can capture it. Null offsets: one weight, every row.
  const int32_t* offsets = nullptr;  // [E + 1]
  const int32_t* groups = nullptr;   // [G]
  int group_blocks = 0;
};

// split_k > 0 forces the number of K slices (clamped to [1, KB]); 0 picks one that fills num_sms. x_buffers 2 asks
// for X staged in two buffers of half the size, the next chunk's copies in flight while the current one multiplies
// (an experiment against the default 1: the plan keeps 1 where two buffers of one K block exceed the shared memory
// or a slice is one chunk of the halved size anyway). For a grouped
// call N is the most rows one group can have, groups the number of groups, and typical_rows (0: N) the rows a
// group usually has: the token tile is sized for those, token blocks cover N, and the split-K counts only the
// blocks with rows (the rest leave at once). At decode a mixture's expert gets a few of the N rows (Qwen3-30B-A3B,
// 64 tokens: 512 rows over 128 experts, ~4 each), and a tile sized for N would multiply mostly zero rows.
Spmm24Plan spmm24_plan(int M, int N, int K, int num_sms, int split_k, int groups = 1, int typical_rows = 0,
                       int x_buffers = 1);

cudaError_t spmm24_launch(const Spmm24Args& args, const Spmm24Plan& plan, DType dtype, cudaStream_t stream);

// The prefill kernel for Hopper (spmm24_sm90.cu, wgmma.sp): same arguments and weight layout (workspace and
// counters unused). Its code exists only in the sm_90a image, which runs only on compute capability 9.0.
// Pipelines: kPlain waits for each stage's wgmmas; kOverlap keeps one stage's in flight (both: every thread
// loads with cp.async); kTma has a producer warpgroup load each stage with TMA (spmm24_sm90_tma.cu), and
// kTmaMulticast pairs blocks along M in a cluster that loads each X tile once for both.
enum class Sm90Pipeline { kPlain = 0, kOverlap = 1, kTma = 2, kTmaMulticast = 3 };

struct Spmm24Sm90Plan {
  int tile_n;    // tokens per block, the N of the wgmma instruction: 64, 128 or 256
  int m_blocks;  // grid.x: blocks of 128 rows of W (8 m-tiles, one per MMA warp); even with a cluster of 2
  int n_blocks;  // grid.y: blocks of tile_n tokens
  int stages;    // 64-column K stages in shared memory
  int pipeline;  // an Sm90Pipeline
  int cluster;   // blocks per cluster along M: 2 for kTmaMulticast, else 1
  int smem_bytes;
};

// tile_n 0 picks one from the grid it gives; 64, 128 or 256 forces it.
Spmm24Sm90Plan spmm24_sm90_plan(int M, int N, int num_sms, int tile_n, Sm90Pipeline pipeline);

cudaError_t spmm24_sm90_launch(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype, cudaStream_t stream);

// The TMA pipelines' launch (spmm24_sm90_tma.cu), reached through spmm24_sm90_launch.
cudaError_t spmm24_sm90_tma_launch(const Spmm24Args& args, const Spmm24Sm90Plan& plan, DType dtype,
                                   cudaStream_t stream);

// Launches a one-thread probe that writes 1 to the device int *flag when the current device runs this file's
// sm_90a code, 0 when it runs a build without it; the caller reads the flag.
cudaError_t spmm24_sm90_present(int* flag, cudaStream_t stream);

}  // namespace sdsengine
