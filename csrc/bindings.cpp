// Python bindings of sdsengine._C: the door to the CUDA kernels. Every input is checked here (device,
// dtype, shape, alignment, contiguity) with the offending values named, so the kernels can assume
// valid input.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// The few ATen headers used, not torch/extension.h (all of ATen's operators and torch's C++ API): this file is
// the extension build's long pole, 29 s -> 11 s at -O3 on 2 cores, and the GPU suite installs within its lease
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with torch's Tensor casters

#include <array>
#include <cstdio>
#include <map>
#include <string>
#include <mutex>
#include <type_traits>
#include <utility>

#include "spmm24.h"

namespace {

// Error messages are built here as one plain string, and TORCH_CHECK gets that string alone. A number
// streamed into TORCH_CHECK (c10::str's ostringstream) crashed the process on the GPU machines instead of
// raising (torch 2.11+cu130, the extension built there by gcc 13): shapes on the H100 (11-23), a plain int64
// on the H200 (12-04), inside ostream::_M_insert<long> resolved to this module (gdb, benchmarks/NOTES.md).
// Strings went through unharmed; std::to_string and snprintf touch no stream or locale facet.
std::string piece(const std::string& text) { return text; }
std::string piece(const char* text) { return text; }
std::string piece(at::ScalarType dtype) { return c10::toString(dtype); }
std::string piece(const at::Device& device) { return device.str(); }
std::string piece(const void* address) {
  char out[32];
  std::snprintf(out, sizeof out, "%p", address);
  return out;
}
template <typename Number, std::enable_if_t<std::is_arithmetic_v<Number>, int> = 0>
std::string piece(Number number) {
  return std::to_string(number);
}
template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  return (std::string("sdsengine._C.spmm24: ") + ... + piece(pieces));
}

#define SDS_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))

constexpr int64_t kRowsPerTile = 16;
constexpr int64_t kColsPerBlock = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// "[a, b, c]" for error messages (see piece: an IntArrayRef streamed into TORCH_CHECK crashed the process).
std::string dims(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

// Straight from the runtime (ATen's device-properties header pulls in cuBLAS/cuSPARSE headers we do not
// need), cached so the hot path and CUDA-graph capture make no driver query after the first call.
int device_attribute(const at::Device& device, cudaDeviceAttr attr) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(device.index()), static_cast<int>(attr));
  auto it = cache.find(key);
  if (it == cache.end()) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device.index()));
    it = cache.emplace(key, value).first;
  }
  return it->second;
}

// align: the bytes the kernels read at once from this tensor (16 where they copy 16-byte vectors)
void check_placed(const at::Tensor& t, const char* name, const at::Device& device, int64_t align = 16) {
  SDS_CHECK(t.device() == device, name, " is on ", t.device(), " but x is on ", device);
  SDS_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", dims(t.sizes()), ", strides ", dims(t.strides()),
            ")");
  SDS_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0, name, " must be ", align,
            "-byte aligned, its data starts at ", t.data_ptr());
}

void check_x(const at::Tensor& x) {
  SDS_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  SDS_CHECK(x.dim() == 2, "x must be 2-D (tokens, in_features), got shape ", dims(x.sizes()));
  SDS_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
            "x must be float16 or bfloat16, got ", x.scalar_type());
  SDS_CHECK(x.size(1) > 0 && x.size(1) % 32 == 0 && x.size(1) < (int64_t{1} << 31),
            "in_features must be a positive multiple of 32 that fits in int32, got ", x.size(1));
  check_placed(x, "x", x.device());
  const int major = device_attribute(x.device(), cudaDevAttrComputeCapabilityMajor);
  SDS_CHECK(major >= 8, "needs compute capability 8.0 or newer (sparse tensor cores), device ", x.device().index(),
            " is ", major, ".", device_attribute(x.device(), cudaDevAttrComputeCapabilityMinor));
}

// values [Mt, KB*8, 32, 8] and meta [Mt, KB, 32, 4] as written by sdsengine.ops.reorder_24; a grouped call's
// stack them, one per expert ([E, Mt, ...]: experts = E; -1 for one weight).
void check_weight(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t m,
                  int64_t experts = -1) {
  const int64_t k = x.size(1), mt = ceil_div(m, kRowsPerTile), kb = ceil_div(k, kColsPerBlock);
  SDS_CHECK(m > 0, "out_features must be positive, got ", m);
  SDS_CHECK(values.scalar_type() == x.scalar_type(), "values dtype ", values.scalar_type(), " differs from x dtype ",
            x.scalar_type());
  SDS_CHECK(meta.scalar_type() == at::kInt, "meta must be int32, got ", meta.scalar_type());
  std::vector<int64_t> values_shape{mt, kb * 8, 32, 8}, meta_shape{mt, kb, 32, 4};
  if (experts >= 0) {
    values_shape.insert(values_shape.begin(), experts);
    meta_shape.insert(meta_shape.begin(), experts);
  }
  const at::IntArrayRef want_values(values_shape), want_meta(meta_shape);
  SDS_CHECK(values.sizes() == want_values, "values must have the reordered shape ", dims(want_values),
            " for out_features=", m, ", in_features=", k, "; got ", dims(values.sizes()),
            " (was it passed through sdsengine.ops.reorder_24?)");
  SDS_CHECK(meta.sizes() == want_meta, "meta must have the reordered shape ", dims(want_meta),
            " for out_features=", m, ", in_features=", k, "; got ", dims(meta.sizes()));
  check_placed(values, "values", x.device());
  check_placed(meta, "meta", x.device());
}

// bias [M], or a grouped call's [E, M] (experts = E; -1 for one weight)
void check_bias(const at::Tensor& x, const at::Tensor& bias, int64_t m, int64_t experts = -1) {
  const bool fits = experts < 0 ? bias.dim() == 1 && bias.size(0) == m
                                : bias.dim() == 2 && bias.size(0) == experts && bias.size(1) == m;
  SDS_CHECK(fits, "bias must have shape (", experts < 0 ? "" : std::to_string(experts) + ", ", m,
            experts < 0 ? ",)" : ")", ", got ", dims(bias.sizes()));
  SDS_CHECK(bias.scalar_type() == x.scalar_type(), "bias dtype ", bias.scalar_type(), " differs from x dtype ",
            x.scalar_type());
  SDS_CHECK(bias.device() == x.device(), "bias is on ", bias.device(), " but x is on ", x.device());
  SDS_CHECK(bias.is_contiguous(), "bias must be contiguous, strides ", dims(bias.strides()));
}

// The launch grid's y and z extents stop at 65535 blocks; past that a launch fails with an unnamed error.
void check_grid(int blocks, const char* what, int64_t tokens) {
  SDS_CHECK(blocks <= 65535, tokens, " tokens need ", blocks, " ", what, ", more than the launch grid's 65535: ",
            "split the call into fewer tokens");
}

// rows: the most rows one group has (all of x's for one weight); groups: a grouped call's, else 1.
sdsengine::Spmm24Plan plan_for(const at::Tensor& x, int64_t m, int64_t split_k, int64_t rows, int64_t groups = 1,
                               int64_t typical_rows = 0, int64_t x_buffers = 1) {
  SDS_CHECK(split_k >= 0, "split_k must be >= 0 (0 = automatic), got ", split_k);
  SDS_CHECK(x_buffers == 1 || x_buffers == 2, "x_buffers must be 1 or 2, got ", x_buffers);
  SDS_CHECK(m < (int64_t{1} << 31) && x.size(0) < (int64_t{1} << 31), "sizes must fit in int32, got M=", m,
            ", N=", x.size(0));
  const int sms = device_attribute(x.device(), cudaDevAttrMultiProcessorCount);
  const auto plan = sdsengine::spmm24_plan(static_cast<int>(m), static_cast<int>(rows), static_cast<int>(x.size(1)),
                                           sms, static_cast<int>(split_k), static_cast<int>(groups),
                                           static_cast<int>(typical_rows), static_cast<int>(x_buffers));
  check_grid(plan.token_blocks * static_cast<int>(groups), "token blocks", x.size(0));
  return plan;
}

// Split-K tickets: the caller's zeroed buffer (kept zero by the kernel) when it is large enough, so a
// call launches nothing but the kernel; otherwise fresh zeros for this call.
at::Tensor counters_for(const at::Tensor& x, const c10::optional<at::Tensor>& locks, int64_t needed) {
  if (locks.has_value()) {
    SDS_CHECK(locks->scalar_type() == at::kInt && locks->dim() == 1 && locks->is_contiguous(),
              "locks must be a contiguous 1-D int32 tensor, got ", locks->scalar_type(), " of shape ",
              dims(locks->sizes()));
    SDS_CHECK(locks->device() == x.device(), "locks is on ", locks->device(), " but x is on ", x.device());
    if (locks->numel() >= needed) return *locks;
  }
  return at::zeros({needed}, x.options().dtype(at::kInt));
}

// Whether this device runs the sm_90a image of spmm24_sm90.cu: asked once per device by launching a probe
// and reading its answer back, which cannot happen inside CUDA-graph capture.
bool sm90a_present(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, bool> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device.index());
  if (it == cache.end()) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    SDS_CHECK(capture == cudaStreamCaptureStatusNone, "the first wgmma.sp call on device ", device.index(),
              " is inside CUDA-graph capture, where its one-time check of the build's sm_90a code cannot run: ",
              "call the layer once before capturing");
    auto flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
    C10_CUDA_CHECK(sdsengine::spmm24_sm90_present(flag.data_ptr<int>(), stream.stream()));
    it = cache.emplace(device.index(), flag.item<int>() == 1).first;
  }
  return it->second;
}

void check_sm90(const at::Tensor& x, int64_t tile_n) {
  const int major = device_attribute(x.device(), cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(x.device(), cudaDevAttrComputeCapabilityMinor);
  SDS_CHECK(major == 9 && minor == 0, "spmm24_sm90 needs compute capability 9.0 (wgmma.sp is sm_90a code), device ",
            x.device().index(), " is ", major, ".", minor);
  SDS_CHECK(tile_n == 0 || tile_n == 64 || tile_n == 128 || tile_n == 256,
            "tile_n must be 0 (automatic), 64, 128 or 256, got ", tile_n);
  SDS_CHECK(x.size(0) < (int64_t{1} << 31), "the token count must fit in int32, got ", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  SDS_CHECK(sm90a_present(x.device()),
            "this build of sdsengine._C has no sm_90a code (nvcc needs -gencode=arch=compute_90a,code=sm_90a)");
}

// The Hopper kernel's pipelines by the names Python uses (spmm24.h says what each does).
constexpr std::array<const char*, 4> kSm90Pipelines = {"plain", "overlap", "tma", "tma_multicast"};

sdsengine::Sm90Pipeline sm90_pipeline(const std::string& name) {
  std::string names;
  for (size_t i = 0; i < kSm90Pipelines.size(); ++i) {
    if (name == kSm90Pipelines[i]) return static_cast<sdsengine::Sm90Pipeline>(i);
    names += (i ? ", " : "") + std::string(kSm90Pipelines[i]);
  }
  SDS_CHECK(false, "pipeline must be one of ", names, "; got '", name, "'");
  return sdsengine::Sm90Pipeline::kPlain;
}

sdsengine::Spmm24Sm90Plan sm90_plan_for(const at::Tensor& x, int64_t m, int64_t tile_n, const std::string& pipeline) {
  SDS_CHECK(m < (int64_t{1} << 31), "out_features must fit in int32, got ", m);
  const int sms = device_attribute(x.device(), cudaDevAttrMultiProcessorCount);
  const auto plan = sdsengine::spmm24_sm90_plan(static_cast<int>(m), static_cast<int>(x.size(0)), sms,
                                                static_cast<int>(tile_n), sm90_pipeline(pipeline));
  check_grid(plan.n_blocks, "token blocks", x.size(0));
  return plan;
}

// The kernels' arguments from checked tensors; y is (N, out_features) = (x.size(0), y.size(1)); values and meta are
// one weight's or a grouped call's stack (Mt and KB read from their trailing dims).
sdsengine::Spmm24Args kernel_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& y, float* workspace,
                                  int* counters) {
  return {x.data_ptr(),
          values.data_ptr(),
          meta.data_ptr<int32_t>(),
          bias.has_value() ? bias->data_ptr() : nullptr,
          y.data_ptr(),
          workspace,
          counters,
          static_cast<int>(y.size(1)),
          static_cast<int>(x.size(0)),
          static_cast<int>(x.size(1)),
          static_cast<int>(values.size(values.dim() - 4)),  // Mt (after the experts dim of a grouped call)
          static_cast<int>(meta.size(meta.dim() - 3))};     // KB
}

sdsengine::DType dtype_of(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf ? sdsengine::DType::kHalf : sdsengine::DType::kBFloat16;
}

}  // namespace

// Y = X . W^T (+ bias) with W 2:4-compressed and reordered; X (N, K) -> Y (N, out_features).
// locks: optional int32 zeros reused across calls (see counters_for); they must not be shared by calls
// that run concurrently on different streams.
at::Tensor spmm24(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                  const c10::optional<at::Tensor>& bias, int64_t split_k, const c10::optional<at::Tensor>& locks,
                  int64_t x_buffers) {
  check_x(x);
  check_weight(x, values, meta, out_features);
  if (bias.has_value()) check_bias(x, *bias, out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0) return y;
  const auto plan = plan_for(x, out_features, split_k, x.size(0), 1, 0, x_buffers);
  at::Tensor workspace, counters;
  if (plan.splits > 1) {
    workspace = at::empty({plan.splits, x.size(0), out_features}, x.options().dtype(at::kFloat));
    counters = counters_for(x, locks, int64_t{plan.m_blocks} * plan.token_blocks);
  }
  const auto args = kernel_args(x, values, meta, bias, y, plan.splits > 1 ? workspace.data_ptr<float>() : nullptr,
                                plan.splits > 1 ? counters.data_ptr<int>() : nullptr);
  const cudaError_t err =
      sdsengine::spmm24_launch(args, plan, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream());
  SDS_CHECK(err == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// One launch for the experts of a mixture: Y[r] = X[r] . W_e^T (+ bias_e) for the rows r of each expert e, x's rows
// grouped by expert (offsets[e] .. offsets[e + 1]), values/meta/bias stacked per expert ([E, ...]). groups names
// the experts to run, -1 for none; max_rows bounds each expert's rows. Rows of no listed expert are zeros. The
// routing (offsets, groups) stays on the device and is read by the kernel, not here: nothing waits for the GPU,
// and CUDA graphs can capture the call. It trusts them to be well formed (offsets non-decreasing from 0, no
// expert listed twice, none with more than max_rows rows: the blocks cover max_rows rows of each expert, rounded
// up to whole token tiles, and leave any further rows zero), as sdsengine.nn.grouped builds them.
at::Tensor spmm24_grouped(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                          const at::Tensor& offsets, const at::Tensor& groups, int64_t out_features, int64_t max_rows,
                          const c10::optional<at::Tensor>& bias, int64_t split_k,
                          const c10::optional<at::Tensor>& locks, int64_t typical_rows) {
  check_x(x);
  SDS_CHECK(values.dim() == 5 && meta.dim() == 5, "grouped values and meta must be 5-D (experts first), got ",
            dims(values.sizes()), " and ", dims(meta.sizes()));
  const int64_t experts = values.size(0);
  check_weight(x, values, meta, out_features, experts);
  for (const auto& [t, name] : {std::pair{&offsets, "offsets"}, std::pair{&groups, "groups"}}) {
    SDS_CHECK(t->scalar_type() == at::kInt && t->dim() == 1, name, " must be a 1-D int32 tensor, got ",
              t->scalar_type(), " of shape ", dims(t->sizes()));
    check_placed(*t, name, x.device(), 4);  // read one int32 at a time
  }
  SDS_CHECK(offsets.size(0) == experts + 1, "offsets must have experts + 1 = ", experts + 1, " entries, got ",
            offsets.size(0));
  SDS_CHECK(groups.size(0) > 0, "groups is empty: name at least one expert (or -1)");
  SDS_CHECK(max_rows > 0 && max_rows <= x.size(0), "max_rows must be in [1, ", x.size(0), "] (x's rows), got ",
            max_rows);
  SDS_CHECK(typical_rows >= 0 && typical_rows <= max_rows, "typical_rows must be in [0, max_rows = ", max_rows,
            "] (0: max_rows), got ", typical_rows);
  if (bias.has_value()) check_bias(x, *bias, out_features, experts);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::zeros({x.size(0), out_features}, x.options());  // rows of no listed expert stay zero
  const auto plan = plan_for(x, out_features, split_k, max_rows, groups.size(0), typical_rows);
  at::Tensor workspace, counters;
  if (plan.splits > 1) {
    workspace = at::empty({plan.splits, x.size(0), out_features}, x.options().dtype(at::kFloat));
    counters = counters_for(x, locks, int64_t{plan.m_blocks} * plan.token_blocks * plan.groups);
  }
  auto args = kernel_args(x, values, meta, bias, y, plan.splits > 1 ? workspace.data_ptr<float>() : nullptr,
                          plan.splits > 1 ? counters.data_ptr<int>() : nullptr);
  args.offsets = offsets.data_ptr<int32_t>();
  args.groups = groups.data_ptr<int32_t>();
  const cudaError_t err =
      sdsengine::spmm24_launch(args, plan, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream());
  SDS_CHECK(err == cudaSuccess, "grouped kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// The launch plan the kernel would use, for tests and benchmarks: a dict of ints.
pybind11::dict spmm24_plan(const at::Tensor& x, int64_t out_features, int64_t split_k, int64_t x_buffers) {
  check_x(x);
  SDS_CHECK(x.size(0) > 0, "x has no rows: a launch plan needs at least one token");  // the plan divides by them
  const auto plan = plan_for(x, out_features, split_k, x.size(0), 1, 0, x_buffers);
  pybind11::dict d;
  d["n_tiles"] = plan.n_tiles;
  d["token_blocks"] = plan.token_blocks;
  d["groups"] = plan.groups;
  d["m_blocks"] = plan.m_blocks;
  d["splits"] = plan.splits;
  d["kb_per_split"] = plan.kb_per_split;
  d["kb_per_chunk"] = plan.kb_per_chunk;
  d["x_buffers"] = plan.x_buffers;
  d["smem_bytes"] = plan.smem_bytes;
  return d;
}

// The Hopper prefill kernel (wgmma.sp): same arguments and weight as spmm24, without split-K.
at::Tensor spmm24_sm90(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t out_features,
                       const c10::optional<at::Tensor>& bias, int64_t tile_n, const std::string& pipeline) {
  check_x(x);
  check_weight(x, values, meta, out_features);
  if (bias.has_value()) check_bias(x, *bias, out_features);
  check_sm90(x, tile_n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0) return y;
  const auto plan = sm90_plan_for(x, out_features, tile_n, pipeline);
  const auto args = kernel_args(x, values, meta, bias, y, nullptr, nullptr);
  const cudaError_t err =
      sdsengine::spmm24_sm90_launch(args, plan, dtype_of(x), c10::cuda::getCurrentCUDAStream().stream());
  SDS_CHECK(err == cudaSuccess, "spmm24_sm90 launch failed: ", cudaGetErrorString(err));
  return y;
}

pybind11::dict spmm24_sm90_plan(const at::Tensor& x, int64_t out_features, int64_t tile_n,
                                const std::string& pipeline) {
  check_x(x);
  check_sm90(x, tile_n);
  const auto plan = sm90_plan_for(x, out_features, tile_n, pipeline);
  pybind11::dict d;
  d["tile_n"] = plan.tile_n;
  d["m_blocks"] = plan.m_blocks;
  d["n_blocks"] = plan.n_blocks;
  d["stages"] = plan.stages;
  d["pipeline"] = kSm90Pipelines[plan.pipeline];
  d["cluster"] = plan.cluster;
  d["smem_bytes"] = plan.smem_bytes;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdsengine CUDA kernels: 2:4 sparse x dense matmul on sparse tensor cores (mma.sp; wgmma.sp on sm_90a)";
  m.def("spmm24", &spmm24, "Y = X W^T (+ bias), W 2:4 in the reorder_24 layout", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("out_features"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("split_k") = 0,
        pybind11::arg("locks") = pybind11::none(), pybind11::arg("x_buffers") = 1);
  m.def("spmm24_grouped", &spmm24_grouped,
        "Y = X W_e^T (+ bias_e) for each expert e's rows of X, one launch (mixtures of experts)", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("offsets"), pybind11::arg("groups"),
        pybind11::arg("out_features"), pybind11::arg("max_rows"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("split_k") = 0, pybind11::arg("locks") = pybind11::none(), pybind11::arg("typical_rows") = 0);
  m.def("spmm24_plan", &spmm24_plan, "launch plan of spmm24 for x and out_features", pybind11::arg("x"),
        pybind11::arg("out_features"), pybind11::arg("split_k") = 0, pybind11::arg("x_buffers") = 1);
  m.def("spmm24_sm90", &spmm24_sm90, "Y = X W^T (+ bias) with wgmma.sp (compute capability 9.0, sm_90a build)",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("out_features"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("tile_n") = 0, pybind11::arg("pipeline") = "plain");
  m.def("spmm24_sm90_plan", &spmm24_sm90_plan, "launch plan of spmm24_sm90 for x and out_features",
        pybind11::arg("x"), pybind11::arg("out_features"), pybind11::arg("tile_n") = 0,
        pybind11::arg("pipeline") = "plain");
}
