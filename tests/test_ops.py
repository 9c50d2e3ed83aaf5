"""sdsengine.ops: the fragment-order layout (CPU, against the PTX rules) and every backend on a GPU.

The GPU tests compare each backend with an fp32 dense reference; a low-precision backend may have at most
twice the error of PyTorch's dense matmul in the same dtype (plus one ulp of the output scale).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from sdsengine import isolated, ops
from sdsengine.kernels import compress_24
from sdsengine.masks import nm_mask

TOKENS = (1, 3, 7, 13, 17, 100)
EXTRA_TOKENS = (8, 9, 16, 32, 33, 64, 65, 256)  # every n_tiles choice and token-block boundary of our kernel
SHAPES = ((16, 32), (64, 256), (80, 288), (200, 544))  # (out, in): odd tiles, K not a multiple of 256, M % 16
LLM_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
DTYPES = (torch.float16, torch.bfloat16)


def pruned(out_features, in_features, dtype=torch.float32, device="cpu", seed=0):
    """A random weight with exact 2:4 zeros, made where it is used (LLM shapes are slow to prune on a CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g, device=device).to(dtype)
    return w * nm_mask(w.abs(), 2, 4)


# ---------------------------------------------------------------------------------------------------
# Layout (CPU)
# ---------------------------------------------------------------------------------------------------

def tile_seen_by_mma(values_r, meta_r, mt, ks):
    """The dense 16x32 tile of W that mma.sp m16n8k32 reconstructs at (m-tile, k-step) from the
    registers the kernel loads, following the PTX ISA rules written out independently of reorder_24:
    A: lane 4g+t holds, in registers 2*half + h, the kept pair of group t + 4*half of row g + 8*h.
    Metadata (selector ks % 2): lane 4g + 2*sel + (group // 4) holds the 4-bit index pair of group
    `group` of row g + 8*h at bits 16*h + 4*(group % 4), in word (ks % 8) // 2 of its 16 bytes."""
    kb, step = divmod(ks, 8)
    sel, word_index = step % 2, step // 2
    tile = torch.zeros(16, 32, dtype=values_r.dtype)
    for row in range(16):
        g, h = row % 8, row // 8
        for group in range(8):
            reg = (group // 4) * 2 + h
            pair = values_r[mt, ks, 4 * g + group % 4, 2 * reg:2 * reg + 2]
            word = int(meta_r[mt, kb, 4 * g + 2 * sel + group // 4, word_index]) & 0xFFFFFFFF
            nibble = (word >> (16 * h + 4 * (group % 4))) & 0xF
            i0, i1 = nibble & 3, nibble >> 2
            assert i0 < i1, f"unordered metadata {nibble:#x} at tile ({mt}, {ks}) row {row} group {group}"
            tile[row, 4 * group + i0], tile[row, 4 * group + i1] = pair[0], pair[1]
    return tile


@pytest.mark.parametrize("shape", [(16, 32), (40, 96), (48, 288)])
def test_reorder_gives_mma_the_weight(shape):
    w = pruned(*shape)
    values, meta = compress_24(w)
    values_r, meta_r = ops.reorder_24(values, meta)
    mt, kb = values_r.shape[0], meta_r.shape[1]
    assert values_r.shape == (mt, kb * 8, 32, 8) and meta_r.shape == (mt, kb, 32, 4)
    rebuilt = torch.cat([torch.cat([tile_seen_by_mma(values_r, meta_r, i, ks) for ks in range(kb * 8)], dim=1)
                         for i in range(mt)], dim=0)
    assert torch.equal(rebuilt[:shape[0], :shape[1]], w)
    assert not rebuilt[shape[0]:].any() and not rebuilt[:, shape[1]:].any()  # padding is zero weight


@pytest.mark.parametrize("shape", [(16, 256), (17, 288), (40, 96), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unreorder_gives_back_the_canonical_pair(shape, dtype):
    """A lean SparseLinear keeps only our kernel's form and rebuilds the canonical pair from it."""
    values, meta = compress_24(pruned(*shape, dtype))
    values_r, meta_r = ops.reorder_24(values, meta)
    back = ops.unreorder_24(values_r, meta_r, *shape)
    assert torch.equal(back[0], values) and torch.equal(back[1], meta)
    with pytest.raises(ValueError, match=r"not reorder_24's form of a \(16, 288\) weight"):
        ops.unreorder_24(values_r, meta_r, 16, 288)  # another tile count than any of the shapes


def test_reorder_keeps_dtype_and_pads_with_valid_metadata():
    values, meta = compress_24(pruned(20, 64, torch.bfloat16))
    values_r, meta_r = ops.reorder_24(values, meta)
    assert values_r.dtype == torch.bfloat16 and meta_r.dtype == torch.int32
    nibbles = (meta_r.reshape(-1, 1).to(torch.int64) & 0xFFFFFFFF) >> torch.arange(0, 32, 4)
    nibbles = nibbles & 0xF
    assert ((nibbles & 3) < (nibbles >> 2)).all()  # ordered_metadata needs i0 < i1 everywhere, pads too


def test_probe_on_cpu_names_dense_only():
    info = ops.probe("cpu")
    assert info["backends"]["dense"] == "ok"
    assert all("CUDA" in reason for b, reason in info["backends"].items() if b != "dense")
    assert ops.available("cpu", torch.float32) == ["dense"]


def test_spmm24_cpu_dense_path():
    w = pruned(48, 64)
    values, meta = compress_24(w)
    x = torch.randn(2, 3, 64)
    bias = torch.randn(48)
    torch.testing.assert_close(ops.spmm24(x, values, meta, bias), x @ w.T + bias)


def test_prepare_refuses_unavailable_backend_on_cpu():
    values, meta = compress_24(pruned(16, 32))
    with pytest.raises(ops.BackendUnavailable, match="sdsengine: needs a CUDA device"):
        ops.prepare("sdsengine", values, meta)


# ---------------------------------------------------------------------------------------------------
# Every backend on a GPU
# ---------------------------------------------------------------------------------------------------

def assert_matches_reference(y, x, w, bias, label):
    """y within twice PyTorch's own error in the same dtype (plus one output ulp) of the fp32 reference."""
    ref = x.float() @ w.float().T + (0 if bias is None else bias.float())
    torch_y = torch.nn.functional.linear(x, w, bias)
    torch_err = (torch_y.float() - ref).abs().max().item()
    diff = (y.float() - ref).abs()
    err = diff.max().item()
    ulp = torch.finfo(y.dtype).eps * ref.abs().max().item()
    if not err <= 2 * torch_err + ulp:
        n, m = divmod(int(diff.argmax()), diff.shape[-1])
        bad = (diff > 2 * torch_err + ulp).nonzero()[:8].tolist()
        pytest.fail(f"{label}: max error {err:.4g} > 2 x torch {torch_err:.4g} + {ulp:.3g}; worst at token {n}, "
                    f"row {m}: got {y.reshape(-1, diff.shape[-1])[n, m].item():.5g}, want {ref[n, m].item():.5g}; "
                    f"first bad (token, row): {bad}")


def gpu_case(shape, tokens, dtype, bias=True, seed=0):
    w = pruned(*shape, dtype=dtype, device="cuda", seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype, generator=g)
    b = torch.randn(shape[0], device="cuda", dtype=dtype, generator=g) if bias else None
    return w, x, b


def run_backend(backend, w, x, b):
    values, meta = compress_24(w)
    try:
        form = ops.prepare(backend, values, meta)
    except ops.BackendUnavailable as exc:
        pytest.skip(str(exc))
    try:
        return ops.run(backend, form, x, b, w.shape[0])
    except RuntimeError as exc:
        if backend in ("sdsengine", *ops.WGMMA_PIPELINES):  # ours: a refusal is a bug, not a library's limit
            raise
        pytest.skip(f"{backend} cannot run ({tuple(w.shape)}, {x.shape[0]} tokens): {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_backend_against_fp32(backend, dtype, shape, tokens):
    w, x, b = gpu_case(shape, tokens, dtype)
    y = run_backend(backend, w, x, b)
    assert y.shape == (tokens, shape[0]) and y.dtype == dtype
    assert_matches_reference(y, x, w, b, f"{backend} {dtype} {shape} x {tokens}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LLM_SHAPES)
@pytest.mark.parametrize("tokens", (1, 16, 100, 2048))
def test_backend_llm_shapes(backend, dtype, shape, tokens):
    w, x, b = gpu_case(shape, tokens, dtype, bias=False)
    assert_matches_reference(run_backend(backend, w, x, b), x, w, b, f"{backend} {dtype} {shape} x {tokens}")


@pytest.mark.gpu
def test_the_extension_loads_on_a_gpu():
    """The tests below skip where the extension is missing; on a GPU with sparse tensor cores a missing or
    broken build must fail here instead of turning the kernel tests into skips."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no sparse tensor cores before compute capability 8.0")
    assert ops.load_extension() is not None, ops.extension_error()


def extension():
    ext = ops.load_extension()
    if ext is None:
        pytest.skip(f"sdsengine extension unavailable: {ops.extension_error()}")
    return ext


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS + EXTRA_TOKENS)
@pytest.mark.parametrize("split_k", (0, 1, 2, 3, 1000))
@pytest.mark.parametrize("bias", (False, True))
def test_kernel_split_k_and_token_tiles(dtype, tokens, split_k, bias):
    ext = extension()
    w, x, b = gpu_case((272, 800), tokens, dtype, bias)  # 17 m-tiles (5 m-blocks, 3 idle warps), K 3.1 blocks
    values_r, meta_r = ops.reorder_24(*compress_24(w))
    y = ext.spmm24(x, values_r, meta_r, w.shape[0], b, split_k)
    plan = ext.spmm24_plan(x, w.shape[0], split_k)
    assert_matches_reference(y, x, w, b, f"{dtype} x {tokens} split_k={split_k} plan={plan}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", (1, 7, 9, 16, 17, 32, 40, 64))
@pytest.mark.parametrize("split_k", (0, 1, 3))
def test_two_x_buffers_give_the_single_buffers_sums(dtype, tokens, split_k):
    """x_buffers=2 stages each chunk of X while the one before multiplies; the MMAs and their order stay, so the
    outputs equal the single buffer's bit for bit. K of 12 blocks (the last one partial): slices of several
    chunks of 5, 2 or 1 blocks at 8, 16 and 32 tokens, odd and even counts of chunks, idle warps."""
    ext = extension()
    w, x, b = gpu_case((272, 3000), tokens, dtype)
    values_r, meta_r = ops.reorder_24(*compress_24(w))
    one = ext.spmm24(x, values_r, meta_r, w.shape[0], b, split_k)
    two = ext.spmm24(x, values_r, meta_r, w.shape[0], b, split_k, None, 2)
    plan = ext.spmm24_plan(x, w.shape[0], split_k, 2)
    assert plan["x_buffers"] == (2 if tokens <= 32 and plan["kb_per_split"] > plan["kb_per_chunk"] else 1), plan
    assert torch.equal(one, two), f"{dtype} x {tokens} split_k={split_k} plan={plan}"
    assert_matches_reference(two, x, w, b, f"{dtype} x {tokens} split_k={split_k} plan={plan}")


@pytest.mark.gpu
def test_decode_plan_splits_k_to_fill_the_gpu():
    ext = extension()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    plan = ext.spmm24_plan(x, 4096, 0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert plan["splits"] > 1 and plan["m_blocks"] * plan["splits"] >= 2 * sms, plan


class FakeSplitKernel:
    """spmm24's launch plan and timing by split_k, without a GPU: splits = min(s, 8) (0: the plan's own, 4)."""

    def __init__(self, ms_by_splits):
        self.ms_by_splits, self.launched, self.now, self.timed_on = ms_by_splits, [], None, set()
        self.locks = []

    def spmm24_plan(self, x, out_features, split_k, x_buffers=1):
        return {"splits": min(split_k, 8) if split_k else 4}

    def spmm24(self, x, values, meta, out_features, bias, split_k, locks, x_buffers=1):
        self.launched.append(split_k)
        self.locks.append(locks)
        self.now = self.ms_by_splits[self.spmm24_plan(x, out_features, split_k)["splits"]]
        return torch.zeros(x.shape[0], out_features)

    def time_ms(self, fn, warmup, iters, device):
        self.timed_on.add(device)
        fn()
        return self.now


def fake_split_kernel(monkeypatch, ms_by_splits):
    fake = FakeSplitKernel(ms_by_splits)
    monkeypatch.setattr(ops, "load_extension", lambda: fake)
    monkeypatch.setattr(ops, "time_ms", fake.time_ms)
    monkeypatch.setattr(ops, "_splits", {})
    monkeypatch.setattr(ops, "_split_generation", [0])
    monkeypatch.delenv("SDSENGINE_SPLIT_K", raising=False)
    return fake


FASTER_AT_2 = {1: 9.0, 2: 5.0, 3: 6.0, 4: 7.0, 6: 8.0, 8: 8.0}


@pytest.mark.parametrize("ms_by_splits, chosen", [
    (FASTER_AT_2, 2),  # another split is faster by more than the margin
    ({1: 9.0, 2: 6.9, 3: 8.0, 4: 7.0, 6: 8.0, 8: 8.0}, 0),  # within the margin: the plan's own
])
def test_split_k_is_timed_once_per_shape_and_token_count(monkeypatch, ms_by_splits, chosen):
    fake = fake_split_kernel(monkeypatch, ms_by_splits)
    form = (None, None, {}, {})
    x = torch.zeros(3, 256)
    assert ops.split_k(form, x, None, 512) == chosen
    # each distinct plan timed once: the plan's own as 0, then 1, 2, 3, 6 and 8 (4 and 12.. repeat a plan)
    assert sorted(fake.launched) == [0, 1, 2, 3, 6, 8]
    assert fake.timed_on == {x.device}  # timed where x is, whatever the current device
    assert ops.split_k(form, x, None, 512) == chosen and len(fake.launched) == 6  # cached
    ops.split_k(form, torch.zeros(4, 256), None, 512)  # another token count: timed again
    assert len(fake.launched) == 12
    assert ops.split_k(form, torch.zeros(ops.SPLIT_SEARCH_TOKENS + 1, 256), None, 512) == 0  # past decode: no timing
    monkeypatch.setattr(ops, "capturing", lambda: True)
    assert ops.split_k(form, torch.zeros(5, 256), None, 512) == 0 and len(fake.launched) == 12  # nothing timed
    monkeypatch.setenv("SDSENGINE_SPLIT_K", "6")
    assert ops.split_k(form, x, None, 512) == 6
    assert ops.split_k(form, torch.zeros(ops.SPLIT_SEARCH_TOKENS + 1, 256), None, 512) == 0  # decode only
    monkeypatch.setenv("SDSENGINE_SPLIT_K", "auto")
    with pytest.raises(ValueError, match="SDSENGINE_SPLIT_K must be a whole number"):
        ops.split_k(form, x, None, 512)


def test_run_keeps_the_chosen_split_in_the_weights_form(monkeypatch):
    fake = fake_split_kernel(monkeypatch, FASTER_AT_2)
    form, x = (None, None, {}, {}), torch.zeros(3, 256)
    ops.run("sdsengine", form, x, None, 512)
    assert list(form[3]) == [3] and form[3][3][1] == 2 and fake.launched[-1] == 2
    launched = len(fake.launched)
    ops.run("sdsengine", form, x, None, 512)
    assert len(fake.launched) == launched + 1 and fake.launched[-1] == 2  # looked up, not timed again
    ops.clear_split_choices()  # (SparseLinear's clear_autotune_cache): the form's copy is chosen again
    ops.run("sdsengine", form, x, None, 512)
    assert len(fake.launched) == launched + 1 + 7
    assert ops.split_k(form, torch.zeros(0, 256), None, 512) == 0  # no rows: no plan to time
    monkeypatch.setattr(ops, "capturing", lambda: True)
    captured = (None, None, {}, {})
    ops.run("sdsengine", captured, torch.zeros(5, 256), None, 512)
    assert fake.launched[-1] == 0 and captured[3] == {}  # the plan's own, untimed, and not kept


def test_each_stream_has_its_own_split_k_tickets(monkeypatch):
    """Calls on two streams may run at once: tickets shared between them would mix their slices, so each
    stream gets its own zeroed buffer, made once and reused by that stream's later calls."""
    fake = fake_split_kernel(monkeypatch, FASTER_AT_2)
    form, x = (None, None, {}, {}), torch.zeros(3, 256)
    for stream in (11, 22, 11):
        monkeypatch.setattr(ops, "_stream_id", lambda device, stream=stream: stream)
        ops.run("sdsengine", form, x, None, 512)
    first, second, again = fake.locks[-3:]
    assert sorted(form[2]) == [11, 22] and first is again and first is not second
    assert first.dtype == torch.int32 and not first.any() and first.numel() == ops.LOCKS
    # in capture (a side stream) the tickets of a stream already seen are baked in: no memset per replay
    monkeypatch.setattr(ops, "_stream_id", lambda device: 33)
    monkeypatch.setattr(ops, "capturing", lambda: True)
    ops.run("sdsengine", form, x, None, 512)
    assert fake.locks[-1] is first and sorted(form[2]) == [11, 22]


def test_prepare_refuses_metadata_the_kernels_would_misread(monkeypatch):
    """The mma.sp kernels take the metadata's order on trust: prepare checks it, as decompress_24 does."""
    values, meta = ops.compress_24(torch.randn(16, 64))
    meta[3, 0] = 0  # group 0 of row 3 names column 0 twice
    monkeypatch.setattr(ops, "_why_not", lambda backend, device, dtype: None)
    with pytest.raises(ValueError, match="row 3, group 0"):
        ops.prepare("sdsengine", values, meta)


@pytest.mark.gpu
def test_the_split_search_keeps_a_correct_product():
    """ops.run through the timed split choice gives the reference product, and the choice is cached."""
    extension()
    ops.clear_split_choices()
    w, x, b = gpu_case((4096, 4096), 1, torch.float16)
    form = ops.prepare("sdsengine", *compress_24(w))
    assert_matches_reference(ops.run("sdsengine", form, x, b, 4096), x, w, b, "split search x 1")
    assert len(ops.split_choices()) == 1 and list(form[3]) == [1]  # kept in the form for the next call
    assert ops.run("sdsengine", form, x[:0], b, 4096).shape == (0, 4096)  # no rows: nothing timed or launched


@pytest.mark.gpu
def test_kernel_is_deterministic_and_accepts_views():
    ext = extension()
    w, x, b = gpu_case((512, 1024), 12, torch.float16)
    values_r, meta_r = ops.reorder_24(*compress_24(w))
    first = ext.spmm24(x, values_r, meta_r, 512, b)
    assert torch.equal(first, ext.spmm24(x, values_r, meta_r, 512, b))
    wide = torch.randn(12, 2048, device="cuda", dtype=torch.float16)
    y = ops.run("sdsengine", (values_r, meta_r, {}, {}), wide[:, :1024], b, 512)  # strided view: run copies it
    assert_matches_reference(y, wide[:, :1024].contiguous(), w, b, "strided x")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", (1, 13, 40))
def test_split_k_tickets_are_left_zero_for_the_next_call(tokens):
    ext = extension()
    w, x, b = gpu_case((1024, 4096), tokens, torch.float16)
    values_r, meta_r = ops.reorder_24(*compress_24(w))
    locks = torch.zeros(ops.LOCKS, dtype=torch.int32, device="cuda")
    assert ext.spmm24_plan(x, 1024, 4)["splits"] == 4
    outputs = [ext.spmm24(x, values_r, meta_r, 1024, b, 4, locks) for _ in range(3)]
    assert not locks.any(), locks.nonzero()
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])
    assert_matches_reference(outputs[0], x, w, b, f"split-K with reused tickets x {tokens}")
    tiny = torch.zeros(1, dtype=torch.int32, device="cuda")  # too small: the binding uses its own zeros
    assert torch.equal(ext.spmm24(x, values_r, meta_r, 1024, b, 4, tiny), outputs[0]) and not tiny.any()


def test_the_split_search_times_the_buffer_count_it_is_given(monkeypatch):
    """search_split passes x_buffers to the plan and the kernel (benchmarks/sweep_decode.py times both counts) and
    keeps the fastest split for it (ms by buffers and the plan's splits: min(s, 8), 4 for its own)."""
    ms = {(1, 4): 3.0, (1, 2): 2.0, (2, 8): 1.0}

    class Kernel(FakeSplitKernel):
        def spmm24(self, x, values, meta, out_features, bias, split_k, locks, x_buffers=1):
            self.now = ms.get((x_buffers, self.spmm24_plan(x, out_features, split_k)["splits"]), 5.0)

    fake = Kernel({})
    monkeypatch.setattr(ops, "load_extension", lambda: fake)
    monkeypatch.setattr(ops, "time_ms", fake.time_ms)
    form, x = (None, None, {}, {}), torch.zeros(1, 256)
    assert ops.search_split(form, x, None, 512, 1) == 2 and ops.search_split(form, x, None, 512, 2) == 8


@pytest.mark.gpu
def test_one_weight_on_two_streams_at_once(monkeypatch):
    """Split-K calls on one prepared weight from two streams, overlapping: each stream's tickets are its
    own, so both products stay right and every buffer of tickets is left zero."""
    extension()
    monkeypatch.setenv("SDSENGINE_SPLIT_K", "8")
    w, x, b = gpu_case((4096, 4096), 2, torch.float16)
    form = ops.prepare("sdsengine", *compress_24(w))
    streams = [torch.cuda.Stream() for _ in range(2)]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    outputs = {stream: [] for stream in streams}
    for _ in range(20):
        for stream in streams:
            with torch.cuda.stream(stream):
                outputs[stream].append(ops.run("sdsengine", form, x, b, 4096))
    torch.cuda.synchronize()
    assert len(form[2]) == 2 and not any(locks.any() for locks in form[2].values())
    for ys in outputs.values():
        assert all(torch.equal(ys[0], y) for y in ys[1:])
        assert_matches_reference(ys[0], x, w, b, "split-K on two streams")


@pytest.mark.gpu
def test_kernel_under_cuda_graph():
    ext = extension()
    w, x, b = gpu_case((1024, 2048), 4, torch.bfloat16)
    values_r, meta_r = ops.reorder_24(*compress_24(w))
    locks = torch.zeros(ops.LOCKS, dtype=torch.int32, device="cuda")
    assert ext.spmm24_plan(x, 1024)["splits"] > 1  # the graph holds the split-K path
    ext.spmm24(x, values_r, meta_r, 1024, b, 0, locks)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ext.spmm24(x, values_r, meta_r, 1024, b, 0, locks)
    for seed in (1, 2):  # new inputs each replay; the second replay also needs the tickets reset
        x.copy_(gpu_case((1024, 2048), 4, torch.bfloat16, seed=seed)[1])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, ext.spmm24(x, values_r, meta_r, 1024, b)), seed


@pytest.mark.gpu
def test_reorder_on_gpu_equals_cpu():
    values, meta = compress_24(pruned(200, 544, torch.float16))
    cpu = ops.reorder_24(values, meta)
    gpu = ops.reorder_24(values.cuda(), meta.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


BAD_INPUTS = [  # (the arguments, from a good case x, v, m, b[, more]; the error message expected)
    ("x.float(), v, m, b", "x must be float16 or bfloat16"),
    ("x.t().contiguous().t(), v, m, b", "x must be contiguous"),
    ("x, v.bfloat16(), m, b", "values dtype"),
    ("x, v[:, :-8], m, b", "values must have the reordered shape"),
    ("x, v, m.float(), b", "meta must be int32"),
    ("x, v, m.cpu(), b", "meta is on cpu"),
    ("x, v, m, b[:-1]", "bias must have shape"),
    ("x.cpu(), v, m, b", "x must be a CUDA tensor"),
    ("x.new_zeros(65535 * 64 + 1, 256), v, m, b", "more than the launch grid's 65535"),  # 2 GiB of x
    ("x, v, m, b, 0, None, 3", "x_buffers must be 1 or 2, got 3"),  # then split_k, locks, x_buffers
]
_BAD_INPUT_CHILD = """
import sys, torch
from sdsengine import ops
from sdsengine.kernels import compress_24
from test_ops import gpu_case
ext = ops.load_extension()
w, x, b = gpu_case((64, 256), 4, torch.float16)
v, m = ops.reorder_24(*compress_24(w))
cases = sys.argv[2:]
for i in range(int(sys.argv[1]), len(cases)):
    print(f"CASE {i}", flush=True)
    args = eval(cases[i])
    try:
        ext.spmm24(*args[:3], 64, *args[3:])
        print(f"RESULT {i} no error", flush=True)
    except RuntimeError as exc:
        print(f"RESULT {i} " + " ".join(str(exc).split()), flush=True)
"""


CHILD_TIMEOUT_S = 120  # a hung kernel would otherwise cost the GPU suite's whole test step


def isolated_results(child, cases, family=None):
    """{case index: what `child` printed for it}, each case run in a child process that a crash or a hang
    ends alone (sdsengine.isolated); `child` runs in tests/ so that it can import this file's helpers."""
    return isolated.run_isolated(child, cases, CHILD_TIMEOUT_S, Path(__file__).parent, family)


def test_isolated_cases_survive_a_crash():
    child = """
import os, sys
cases = sys.argv[2:]
for i in range(int(sys.argv[1]), len(cases)):
    print(f"CASE {i}", flush=True)
    try:
        exec(cases[i])
        print(f"RESULT {i} no error", flush=True)
    except RuntimeError as exc:
        print(f"RESULT {i} {exc}", flush=True)
"""
    results = isolated_results(child, ["raise RuntimeError('first')", "os.abort()", "pass"])
    assert results[0] == "first" and results[2] == "no error"
    assert results[1].startswith("the process died (exit status -6")
    cases = ["os.abort()  # a", "pass  # b", "pass  # a", "raise RuntimeError('b')  # b"]
    results = isolated_results(child, cases, family=lambda case: case[-1])
    assert results[0].startswith("the process died")
    assert results[2] == "not run: item 0 of its family ended the process"
    assert results[1] == "no error" and results[3] == "b"


def test_isolated_cases_fail_together_when_the_child_cannot_start():
    results = isolated_results("raise ImportError('no _C')", ["pass", "pass"])
    assert results == {i: "the process ended before its first item (exit status 1: ImportError: no _C)"
                       for i in (0, 1)}


def test_a_child_failure_is_named_by_its_exception_not_by_the_advice_after_it():
    # a CUDA error's message ends with lines of advice; the last ("Compile with `TORCH_USE_CUDA_DSA`...")
    # names nothing
    code = ("raise RuntimeError('CUDA error: an illegal memory access was encountered\\n'"
            "'For debugging consider passing CUDA_LAUNCH_BLOCKING=1\\n'"
            "'Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.')")
    _, failure = isolated.run_child(code)
    assert failure == "exit status 1: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert isolated.run_child("import sys; sys.exit('plain words')")[1] == "exit status 1: plain words"


def test_isolated_cases_survive_a_hang(monkeypatch):
    child = """
import sys, time
cases = sys.argv[2:]
for i in range(int(sys.argv[1]), len(cases)):
    print(f"CASE {i}", flush=True)
    exec(cases[i])
    print(f"RESULT {i} done", flush=True)
"""
    monkeypatch.setattr(sys.modules[__name__], "CHILD_TIMEOUT_S", 5)
    results = isolated_results(child, ["pass", "time.sleep(60)", "pass"])
    assert results[0] == "done" and results[2] == "done"
    assert results[1] == "the process died (no result within 5 s)"


# The wgmma.sp kernel (Hopper): every case in a child process until it has a record on hardware, poisoned
# output memory, tile widths forced and automatic, M not a multiple of the 128-row block (nor, with the
# 2-block cluster, of 256), K of 800 (3.1 blocks of 256: padded weight columns against zero-filled X), token
# counts across tile boundaries, every pipeline, and two Llama shapes (the in-process backend tests run these
# after the child check alone). Cases are grouped by pipeline, and a crash ends its pipeline's cases only: a
# call that leaves the CUDA context unusable (a trap) makes the child exit, so the next pipeline starts clean.
PIPELINES = tuple(ops.WGMMA_PIPELINES.values())
WGMMA_CASES = [f"({shape}, {tokens}, {dtype!r}, {bias}, {tile_n}, {pipeline!r})"
               for pipeline in PIPELINES
               for shape in ((272, 800), (128, 256))
               for tokens in (1, 7, 64, 65, 200, 257, 600)
               for dtype in ("float16", "bfloat16")
               for bias in (False, True)
               for tile_n in (0, 64, 128, 256)
               if shape == (272, 800) or (bias and tile_n == 0)]
WGMMA_CASES += [f"((4096, 4096), 2048, 'float16', False, 0, {pipeline!r})" for pipeline in PIPELINES]
WGMMA_CASES += [f"((1024, 14336), 300, 'bfloat16', True, 0, {pipeline!r})" for pipeline in PIPELINES]
_WGMMA_CHILD = """
import os, sys, torch
from sdsengine import ops
from sdsengine.kernels import compress_24
from test_ops import assert_matches_reference, gpu_case
ext = ops.load_extension()
cases = sys.argv[2:]
for i in range(int(sys.argv[1]), len(cases)):
    print(f"CASE {i}", flush=True)
    shape, tokens, dtype, bias, tile_n, pipeline = eval(cases[i])
    w, x, b = gpu_case(shape, tokens, getattr(torch, dtype), bias)
    v, m = ops.reorder_24(*compress_24(w))
    poison = torch.full((tokens * shape[0],), float("nan"), device="cuda", dtype=x.dtype)
    del poison  # the allocator hands this block to y: an element the kernel misses stays NaN
    try:
        y = ext.spmm24_sm90(x, v, m, shape[0], b, tile_n, pipeline)
        plan = ext.spmm24_sm90_plan(x, shape[0], tile_n, pipeline)
        assert_matches_reference(y, x, w, b, f"plan {plan}")
        print(f"RESULT {i} ok", flush=True)
    except BaseException as exc:  # pytest.fail raises a BaseException
        print(f"RESULT {i} " + " ".join(str(exc).split()), flush=True)
        try:
            torch.cuda.synchronize()
        except RuntimeError:  # the context is lost (a trap): later cases need a fresh process
            os._exit(3)
"""


def _wgmma_pipeline(case):
    return eval(case)[-1]


def hopper_extension():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma.sp kernel runs on compute capability 9.0 only")
    return extension()


@pytest.fixture(scope="module")
def wgmma_results():
    """{case index: result}; the cases of a pipeline already switched off (SDSENGINE_WGMMA, e.g. by the GPU
    suite's own check) are not run again: each could cost a trap's ~35 s."""
    hopper_extension()
    off = {pipeline: why for backend, pipeline in ops.WGMMA_PIPELINES.items() if (why := ops._wgmma_switch(backend))}
    run = [i for i, case in enumerate(WGMMA_CASES) if _wgmma_pipeline(case) not in off]
    ran = isolated_results(_WGMMA_CHILD, [WGMMA_CASES[i] for i in run], family=_wgmma_pipeline)
    results = {i: off.get(_wgmma_pipeline(case)) for i, case in enumerate(WGMMA_CASES)}
    results.update({i: ran[k] for k, i in enumerate(run)})
    turn_off_failed_pipelines(results)
    return results


def turn_off_failed_pipelines(results):
    """A pipeline that failed any isolated case ({case index: result}) is off for the rest of the session
    (SDSENGINE_WGMMA lists the others), so the in-process tests skip it rather than run a kernel that may
    kill the CUDA context; these cases run first (conftest.py)."""
    failed = {_wgmma_pipeline(case) for i, case in enumerate(WGMMA_CASES) if results[i] != "ok"}
    if failed:
        kept = [backend for backend, pipeline in ops.WGMMA_PIPELINES.items()
                if pipeline not in failed and ops.wgmma_error(backend) is None]
        os.environ["SDSENGINE_WGMMA"] = ops.wgmma_setting(kept)
        if os.environ.get("SUITE_SWITCHES"):  # the GPU suite's later steps take it from there
            with open(os.environ["SUITE_SWITCHES"], "a") as f:
                f.write(f"export SDSENGINE_WGMMA={os.environ['SDSENGINE_WGMMA']}\n")


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(WGMMA_CASES)), ids=WGMMA_CASES)
def test_wgmma_kernel_against_fp32(wgmma_results, case):
    if wgmma_results[case].startswith("turned off by"):
        pytest.skip(wgmma_results[case])
    assert wgmma_results[case] == "ok", wgmma_results[case]


@pytest.mark.gpu
def test_wgmma_backends_pass_their_child_check_on_hopper():
    """run_backend skips an unavailable backend; on Hopper a failed self-check must fail here instead."""
    hopper_extension()
    failed = {b: ops.wgmma_error(b) for b in ops.WGMMA_PIPELINES}
    assert not any(failed.values()), failed


_CAPTURE_FIRST_CHILD = """
import sys, torch
from sdsengine import ops
from sdsengine.kernels import compress_24
from test_ops import gpu_case
ext = ops.load_extension()
w, x, b = gpu_case((256, 512), 4, torch.float16)
v, m = ops.reorder_24(*compress_24(w))
print("CASE 0", flush=True)
try:
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        ext.spmm24_sm90(x, v, m, 256, b, 0, "plain")
    print("RESULT 0 no error", flush=True)
except RuntimeError as exc:
    print("RESULT 0 " + " ".join(str(exc).split()), flush=True)
"""


@pytest.mark.gpu
def test_a_first_wgmma_call_inside_capture_is_refused_by_name():
    """The build's sm_90a code is checked once per device by a probe whose answer is read back, which
    capture forbids: a first call inside capture says so (in a child, whose probe has not run yet)."""
    hopper_extension()
    result = isolated_results(_CAPTURE_FIRST_CHILD, ["first call in capture"])[0]
    assert "inside CUDA-graph capture" in result, result


@pytest.mark.gpu
def test_wgmma_plan_fills_the_gpu_with_the_widest_tile():
    ext = hopper_extension()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.float16)
    plan = ext.spmm24_sm90_plan(x, 4096)
    assert plan["tile_n"] == 256 and plan["m_blocks"] * plan["n_blocks"] >= sms, plan
    assert ext.spmm24_sm90_plan(x[:16], 4096)["tile_n"] == 64
    with pytest.raises(RuntimeError, match="tile_n must be 0"):
        ext.spmm24_sm90_plan(x, 4096, 96)
    multicast = ext.spmm24_sm90_plan(x, 272, 128, "tma_multicast")
    assert (multicast["cluster"], multicast["m_blocks"], multicast["pipeline"]) == (2, 4, "tma_multicast"), multicast
    with pytest.raises(RuntimeError, match="pipeline must be one of"):
        ext.spmm24_sm90_plan(x, 4096, 0, "pingpong")


@pytest.fixture(scope="module")
def bad_input_results():
    """The binding's error message per BAD_INPUTS case, each called in a child process: a message that
    crashes the process (as shapes streamed into TORCH_CHECK did on the H100, 11-23) fails its own case
    instead of ending the whole GPU test run."""
    extension()
    return isolated_results(_BAD_INPUT_CHILD, [args for args, _ in BAD_INPUTS])


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[m for _, m in BAD_INPUTS])
def test_binding_names_bad_inputs(bad_input_results, case):
    assert BAD_INPUTS[case][1] in bad_input_results[case], bad_input_results[case]


def absent_by_design(backend):
    """Whether this GPU and torch build cannot have the backend at all (not a failure of it)."""
    capability = torch.cuda.get_device_capability()
    if backend == "cutlass":
        return capability[0] != 8
    if backend in ops.WGMMA_PIPELINES:
        return capability != (9, 0)
    if backend == "cusparselt":
        return not (hasattr(torch.backends, "cusparselt") and torch.backends.cusparselt.is_available())
    return False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_self_check_passes(dtype):
    """Every backend this GPU can have passes its check: one that failed it (in a child process, or here) or
    that the suite turned off after a failed check must fail here, not turn its tests into skips."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no sparse tensor cores before compute capability 8.0")
    info = ops.probe("cuda", dtype, self_check=True)
    not_ok = {b: s for b, s in info["backends"].items() if s != "ok" and not absent_by_design(b)}
    assert not not_ok, info


@pytest.mark.gpu
def test_cusparselt_passes_its_child_check():
    """run_backend skips an unavailable backend; where torch has cuSPARSELt, a failed check of it (of the
    library, or of our use of it in either form) must fail here instead."""
    if torch.cuda.get_device_capability()[0] < 8 or absent_by_design("cusparselt"):
        pytest.skip("no cuSPARSELt on this GPU or in this torch build")
    assert ops.cusparselt_error() is None, ops.cusparselt_error()


def test_child_process_check_reports_the_failure_and_passes_a_clean_run():
    assert ops._run_check("pass", "probe") is None
    reason = ops._run_check("raise SystemExit('no sparse tensor cores here')", "probe")
    assert "probe failed its self-check" in reason and "no sparse tensor cores here" in reason


@pytest.mark.parametrize("backend", ("cusparselt", "wgmma"))
def test_backend_switch_skips_the_child_check(monkeypatch, backend):
    monkeypatch.setattr(isolated, "run_child", lambda *args: pytest.fail("the child check must not run"))
    error = getattr(ops, f"{backend}_error")
    monkeypatch.setenv(f"SDSENGINE_{backend.upper()}", "0")
    assert error() == f"turned off by SDSENGINE_{backend.upper()}=0"
    monkeypatch.setenv(f"SDSENGINE_{backend.upper()}", "1")
    assert error() is None


def test_wgmma_pipelines_are_checked_in_one_child_and_a_crash_fails_one_alone(monkeypatch):
    """One child checks every pipeline; the one that kills it fails with the child's last words, and a new
    child checks the rest. Each result is kept for the process."""
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.delenv("SDSENGINE_WGMMA", raising=False)
    children = []

    def child(code, args, timeout_s, cwd):
        backends = args[1:]
        children.append(backends)
        if "wgmma_tma" in backends:  # plain passes, overlap is wrong, tma traps and takes the child with it
            return ("CASE 0\nRESULT 0 ok\nCASE 1\nRESULT 1 failed: relative error 1.3\nCASE 2\n",
                    "exit status 1: RuntimeError: CUDA error: an illegal instruction was encountered")
        return "".join(f"CASE {i}\nRESULT {i} ok\n" for i in range(len(backends))), None
    monkeypatch.setattr(isolated, "run_child", child)
    assert ops.wgmma_error("wgmma") is None
    assert ops.wgmma_error("wgmma_overlap") == ("wgmma.sp kernel (overlap pipeline) failed its self-check in a "
                                                "child process: failed: relative error 1.3")
    assert "(tma pipeline)" in ops.wgmma_error("wgmma_tma") and "illegal instruction" in ops.wgmma_error("wgmma_tma")
    assert ops.wgmma_error("wgmma_tma_multicast") is None
    assert children == [list(ops.WGMMA_PIPELINES), ["wgmma_tma_multicast"]]
    assert "SDSENGINE_WGMMA" in ops._WGMMA_CHILD  # the child skips its own check


def test_a_wgmma_child_that_checks_nothing_fails_every_pipeline_at_once(monkeypatch):
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.delenv("SDSENGINE_WGMMA", raising=False)
    children = []
    monkeypatch.setattr(isolated, "run_child",
                        lambda code, args, timeout_s, cwd: children.append(args) or ("", "ImportError: no _C"))
    assert all("ImportError: no _C" in ops.wgmma_error(b) for b in ops.WGMMA_PIPELINES)
    assert len(children) == 1


def test_the_wgmma_child_reports_each_pipeline(monkeypatch):
    """The real child, on a machine where the checks cannot pass (no CUDA here, or a kernel that fails):
    every pipeline gets a failure from its own check, none is left unreported."""
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.delenv("SDSENGINE_WGMMA", raising=False)
    if torch.cuda.is_available():
        pytest.skip("on a GPU the GPU tests check the pipelines themselves")
    for backend in ops.WGMMA_PIPELINES:
        error = ops.wgmma_error(backend)
        assert "failed its self-check in a child process: torch.float16: failed:" in error, (backend, error)
        assert "no result" not in error and "before its first item" not in error, (backend, error)


def test_wgmma_switch_may_list_the_pipelines_to_use_unchecked(monkeypatch):
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.setattr(isolated, "run_child", lambda *args, **kwargs: pytest.fail("no check with a switch"))
    monkeypatch.setenv("SDSENGINE_WGMMA", "wgmma, wgmma_tma")
    assert ops.wgmma_error("wgmma") is None and ops.wgmma_error("wgmma_tma") is None
    assert ops.wgmma_error("wgmma_overlap") == "turned off by SDSENGINE_WGMMA=wgmma, wgmma_tma"
    monkeypatch.setenv("SDSENGINE_WGMMA", "wgmma,sideways")
    with pytest.raises(ValueError, match="SDSENGINE_WGMMA must be 0, 1 or a comma-separated list"):
        ops.wgmma_error("wgmma")


def test_checked_switches_carry_the_child_checks_to_another_process(monkeypatch):
    monkeypatch.setattr(ops, "_cusparselt", {})
    monkeypatch.setattr(ops, "_wgmma", {})
    assert ops.checked_switches() == {}  # nothing checked here
    monkeypatch.setattr(ops, "_cusparselt", {"error": None, "passed": "plain"})
    monkeypatch.setattr(ops, "_wgmma", {"wgmma": None, "wgmma_overlap": "failed", "wgmma_tma": None,
                                        "wgmma_tma_multicast": "failed"})
    switches = ops.checked_switches()
    assert switches == {"SDSENGINE_CUSPARSELT": "1", "SDSENGINE_CUSPARSELT_FORM": "plain",
                        "SDSENGINE_WGMMA": "wgmma,wgmma_tma"}
    monkeypatch.setattr(ops, "_wgmma", {})  # another process, given the settings: the same answers, no check
    monkeypatch.setattr(isolated, "run_child", lambda *args, **kwargs: pytest.fail("checked again"))
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    assert [ops.wgmma_error(b) is None for b in ops.WGMMA_PIPELINES] == [True, False, True, False]
    assert ops.cusparselt_error() is None and ops.cusparselt_form() == "plain"
    monkeypatch.setattr(ops, "_cusparselt", {"error": "failed in both forms"})
    monkeypatch.setattr(ops, "_wgmma", dict.fromkeys(ops.WGMMA_PIPELINES, "failed"))
    assert ops.checked_switches() == {"SDSENGINE_CUSPARSELT": "0", "SDSENGINE_WGMMA": "0"}


def test_failed_wgmma_cases_turn_their_pipeline_off_for_the_session(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.setenv("SDSENGINE_WGMMA", "1")
    # keyed by case index, as isolated.run_isolated returns them (a list once hid that zip read the keys)
    results = {i: "ok" if _wgmma_pipeline(case) != "tma" else "failed: relative error 0.5"
               for i, case in enumerate(WGMMA_CASES)}
    switches = tmp_path / "switches.env"
    monkeypatch.setenv("SUITE_SWITCHES", str(switches))
    turn_off_failed_pipelines(results)
    assert os.environ["SDSENGINE_WGMMA"] == "wgmma,wgmma_overlap,wgmma_tma_multicast"
    assert switches.read_text() == "export SDSENGINE_WGMMA=wgmma,wgmma_overlap,wgmma_tma_multicast\n"
    assert ops.wgmma_error("wgmma_tma") == "turned off by SDSENGINE_WGMMA=wgmma,wgmma_overlap,wgmma_tma_multicast"


def test_the_wgmma_cases_run_before_every_other_test():
    import importlib.util  # tests/conftest.py by its path: "conftest" may name tests/kernels' as well
    spec = importlib.util.spec_from_file_location("top_conftest", Path(__file__).parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    class Item:
        def __init__(self, name):
            self.name, self.originalname = f"{name}[x]", name

        def get_closest_marker(self, name):
            return None
    items = [Item("a"), Item("test_wgmma_kernel_against_fp32"), Item("b"), Item("test_wgmma_kernel_against_fp32")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [item.originalname for item in items] == ["test_wgmma_kernel_against_fp32"] * 2 + ["a", "b"]


def test_wgmma_runs_the_mma_sp_kernels_form():
    assert {ops.form_key(b) for b in ("sdsengine", *ops.WGMMA_PIPELINES)} == {"sdsengine"}
    assert {ops.form_key(b) for b in ("cusparselt", "cutlass", "dense")} == {"cusparselt", "cutlass", "dense"}


@pytest.fixture
def fresh_cusparselt(monkeypatch):
    """No earlier check result and no cuSPARSELt settings from the environment."""
    monkeypatch.setattr(ops, "_cusparselt", {})
    for name in ("SDSENGINE_CUSPARSELT", "SDSENGINE_CUSPARSELT_FORM"):
        monkeypatch.delenv(name, raising=False)


def test_cusparselt_takes_the_first_form_that_passes_its_check(monkeypatch, fresh_cusparselt):
    """On the H100 the transposed form failed its search: the plain form is checked next, in its own child."""
    checked = []

    def check(code, what):
        checked.append(what)
        return "failed: internal error" if "'SDSENGINE_CUSPARSELT_FORM': 'transposed'" in code else None
    monkeypatch.setattr(ops, "_run_check", check)
    assert ops.cusparselt_error() is None and ops.cusparselt_form() == "plain"
    assert checked == ["cuSPARSELt (transposed form)", "cuSPARSELt (plain form)"]
    ops.cusparselt_error()
    assert len(checked) == 2  # once per process


def test_cusparselt_failing_in_every_form_names_each_failure(monkeypatch, fresh_cusparselt):
    monkeypatch.setattr(ops, "_run_check", lambda code, what: f"{what} failed")
    assert ops.cusparselt_error() == "cuSPARSELt (transposed form) failed; cuSPARSELt (plain form) failed"


def test_cusparselt_form_setting_is_checked(monkeypatch, fresh_cusparselt):
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_FORM", "sideways")
    with pytest.raises(ValueError, match="SDSENGINE_CUSPARSELT_FORM must be one of"):
        ops.cusparselt_form()


@pytest.mark.parametrize("form", ops.CUSPARSELT_FORMS)
def test_cusparselt_forms_give_tokens_by_out(monkeypatch, fresh_cusparselt, form):
    """Both forms return the (tokens, out) product, contiguous, with the token padding cut off (cuSPARSELt's
    calls replaced by a dense stand-in that follows their transpose_result contract)."""
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_FORM", form)
    calls = []

    def sparse_mm(packed, xt, bias=None, transpose_result=False, alg_id=0):
        calls.append(transpose_result)
        y = packed @ xt + bias[:, None]
        return y.t().contiguous() if transpose_result else y
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 0, raising=False)
    w, x, b = torch.randn(16, 32), torch.randn(5, 32), torch.randn(16)
    y = ops._run_cusparselt(ops._cusparselt_state(w), x, b)
    assert y.shape == (5, 16) and y.is_contiguous()
    torch.testing.assert_close(y, x @ w.T + b)
    assert calls == [form == "transposed"]


@pytest.mark.gpu
def test_probe_leaves_the_cuda_context_usable():
    # cuSPARSELt once failed inside the probe and every later kernel of the process died (H100, torch 2.11)
    ops.probe("cuda", torch.float16, self_check=True)
    x = torch.randn(256, 256, device="cuda", dtype=torch.float64)
    assert torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu())


def _torch_reading_of(b):
    """What cuSPARSELt's binding reads for a dense operand: by its strides when contiguous, and otherwise as
    the transposed layout, contiguous (it looks at is_contiguous(), not at the strides)."""
    if b.is_contiguous():
        return b
    rows, cols = b.shape
    return torch.as_strided(b, (rows, cols), (1, rows))


def test_cusparselt_gets_a_contiguous_operand_from_a_strided_input(monkeypatch, fresh_cusparselt):
    """A row-strided x (the last token of each sequence, say) with a token count needing no padding."""
    def sparse_mm(packed, xt, bias=None, transpose_result=False, alg_id=0):
        y = packed @ _torch_reading_of(xt)
        return y.t().contiguous() if transpose_result else y
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 0, raising=False)
    w, hidden = torch.randn(16, 32), torch.randn(8, 3, 32)
    x = hidden[:, -1, :]  # 8 tokens, rows 96 elements apart
    torch.testing.assert_close(ops._run_cusparselt(ops._cusparselt_state(w), x, None), x @ w.T)


def test_cusparselt_keeps_no_algorithm_chosen_inside_capture(monkeypatch, fresh_cusparselt):
    searched = []
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda packed, xt, **k: packed @ xt, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: searched.append(1) or 3, raising=False)
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_FORM", "plain")
    state = ops._cusparselt_state(torch.randn(16, 32))
    monkeypatch.setattr(ops, "capturing", lambda: True)
    ops._run_cusparselt(state, torch.randn(8, 32), None)
    assert state["alg"] == {} and not searched  # alg 0 stood in, unsearched and not kept
    monkeypatch.setattr(ops, "capturing", lambda: False)
    ops._run_cusparselt(state, torch.randn(8, 32), None)
    assert state["alg"] == {8: 3}


def test_self_check_compares_with_dense_and_skips_shapes_a_backend_refuses(monkeypatch):
    cpu = torch.device("cpu")
    assert ops._self_check("dense", cpu, torch.float32) == "ok"
    run = ops.run
    monkeypatch.setattr(ops, "run", lambda *a: run(*a) * 1.1)
    assert ops._self_check("dense", cpu, torch.float32).startswith("failed: relative error")
    monkeypatch.setattr(ops, "run", run)
    prepare, ran = ops.prepare, []

    def library_limits(backend, values, meta):  # CUTLASS's: rows % 32, cols % 64
        if values.shape[0] % 32 or 2 * values.shape[1] % 64:
            raise ops.BackendUnavailable("shape")
        ran.append(tuple(values.shape))
        return prepare(backend, values, meta)
    monkeypatch.setattr(ops, "prepare", library_limits)
    assert ops._self_check("dense", cpu, torch.float32) == "ok" and ran == [(256, 256)]
    monkeypatch.setattr(ops, "prepare", lambda *a: (_ for _ in ()).throw(ops.BackendUnavailable("shape")))
    assert "takes none of the self-check shapes" in ops._self_check("dense", cpu, torch.float32)


def test_jit_build_clears_the_lock_of_a_build_that_was_stopped(tmp_path, monkeypatch):
    """torch's lock file outlives a JIT build killed in nvcc, and every later build waited for it forever: our
    own lock (dropped by the kernel with its process) is held around torch's build, so a torch lock found
    under it is stale and removed. torch's build itself is a stand-in here (no GPU)."""
    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "sdsengine_C"
    build.mkdir()
    (build / "lock").write_text("")
    calls = []

    def load(name, sources, build_directory, **kwargs):
        calls.append((name, build_directory, (build / "lock").exists()))
        return "module"
    monkeypatch.setattr(cpp_extension, "load", load)
    assert ops._jit_load(["bindings.cpp"]) == "module"
    assert calls == [("sdsengine_C", str(build), False)]


@pytest.mark.gpu
def test_stream_id_is_the_current_streams_handle():
    """The split-K tickets are kept per stream by the handle read in one C call: it must be the one the
    public API gives, on the default stream and on a side stream."""
    device = torch.device("cuda")
    assert ops._stream_id(device) == torch.cuda.current_stream(device).cuda_stream
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        assert ops._stream_id(device) == side.cuda_stream != torch.cuda.default_stream(device).cuda_stream


def test_run_hands_the_kernels_rows_and_gives_back_the_leading_dimensions(monkeypatch):
    """ops.run takes x (..., K): the kernel backends see (tokens, K), dense sees x as it is."""
    seen = []
    monkeypatch.setattr(ops, "_run_rows", lambda backend, form, x, bias, out: seen.append(tuple(x.shape))
                        or torch.zeros(x.shape[0], out))
    assert ops.run("sdsengine", None, torch.randn(2, 3, 64), None, 32).shape == (2, 3, 32)
    assert ops.run("cusparselt", None, torch.randn(5, 64), None, 32).shape == (5, 32)
    assert seen == [(6, 64), (5, 64)]
    weight = torch.randn(32, 64)
    x = torch.randn(2, 3, 64)
    assert torch.equal(ops.run("dense", weight, x, None, 32), torch.nn.functional.linear(x, weight))
    assert seen == [(6, 64), (5, 64)]


@pytest.fixture
def fresh_captures(monkeypatch):
    monkeypatch.setattr(ops, "_captures", {})
    monkeypatch.delenv("SDSENGINE_CUSPARSELT_GRAPHS", raising=False)


def test_every_child_check_gives_up_after_the_one_limit(fresh_captures, monkeypatch):
    """cuSPARSELt's check, the wgmma pipelines' and a library's capture each end a hung child after
    CHECK_TIMEOUT_S: a capture that hangs after cuSPARSELt's check passed (seconds) still leaves the GPU suite's
    `versions` step (120 s) time to pass the results on."""
    limits = []

    def child(code, args=(), timeout_s=None, cwd=None):
        limits.append(timeout_s)
        return "", "no result"
    monkeypatch.setattr(isolated, "run_child", child)
    monkeypatch.setattr(ops, "_wgmma", {})
    monkeypatch.delenv("SDSENGINE_WGMMA", raising=False)
    monkeypatch.setattr(ops, "cusparselt_form", lambda: "plain")
    ops._run_check("pass", "cuSPARSELt")
    ops.wgmma_error("wgmma")
    ops.capture_error("cusparselt")
    assert len(limits) == 3 and set(limits) == {ops.CHECK_TIMEOUT_S} and ops.CHECK_TIMEOUT_S <= 60


def test_a_library_backend_is_capture_checked_once_in_a_child_and_the_result_passed_on(fresh_captures, monkeypatch):
    """cuSPARSELt's capture is tried in a child process, once; its verdict goes to later processes through
    checked_switches; our kernel and dense are never checked that way; the switch decides without a child."""
    children = []
    monkeypatch.setattr(ops, "cusparselt_form", lambda: "plain")
    monkeypatch.setattr(isolated, "run_child", lambda code, *a, **k: children.append(code) or (
        "", "exit status 1: RuntimeError: CUDA error: operation not permitted when stream is capturing"))
    assert ops.capture_error("sdsengine") is None and ops.capture_error("dense") is None and not children
    why = ops.capture_error("cusparselt")
    assert why == ("cusparselt's call failed its CUDA-graph capture in a child process: exit status 1: "
                   "RuntimeError: CUDA error: operation not permitted when stream is capturing")
    assert ops.capture_error("cusparselt") == why and len(children) == 1
    assert "ops._capture_check('cusparselt')" in children[0] and "'SDSENGINE_CUSPARSELT_FORM': 'plain'" in children[0]
    assert ops.checked_switches()["SDSENGINE_CUSPARSELT_GRAPHS"] == "0"
    monkeypatch.setattr(ops, "_captures", {})
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_GRAPHS", "1")
    assert ops.capture_error("cusparselt") is None and len(children) == 1
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_GRAPHS", "0")
    assert ops.capture_error("cusparselt") == "turned off by SDSENGINE_CUSPARSELT_GRAPHS=0"


@pytest.mark.gpu
def test_our_kernel_passes_the_capture_check_a_library_gets():
    """The child's check itself, run here on our kernel (whose capture is known to work): eager call, capture,
    replay on a new input, against dense."""
    ops._capture_check("sdsengine")
