"""The 2:4 sparse x dense matmul Y = X·Wᵀ (+ bias), and the chain of backends that can run it.

W arrives in the canonical layout of sdsengine.kernels.compress_24 (values rows×K/2, int32 meta rows×K/32).
Each backend *prepares* it once into its own form and then *runs* it per call:

    sdsengine   our mma.sp kernel (csrc/, built as sdsengine._C or JIT-built here); form: reorder_24
    wgmma       our wgmma.sp kernel for Hopper prefill (compute capability 9.0, sm_90a build); same form.
                wgmma_overlap, wgmma_tma, wgmma_tma_multicast: the same kernel's other pipelines (csrc/spmm24.h),
                each a backend of its own, so SparseLinear's timing picks among them per shape and token count
    cusparselt  PyTorch's cuSPARSELt binding (torch._cslt_*): compressed once, algorithm searched once
    cutlass     PyTorch's CUTLASS semi-structured kernel; compute capability 8.x only (it refuses Hopper)
    dense       cuBLAS (or the CPU) on the decompressed weight: always there, the fallback. A lean
                SparseLinear holds no copy: its form decompresses on every call

`probe()` names which backends run on a device and why the others do not. Choosing among them per shape
and token count is SparseLinear's job (sdsengine.nn.sparse_linear), by measurement.
"""
import fcntl
import logging
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from sdsengine import isolated
from sdsengine.cuda_build import NVCC_FLAGS, toolkit_problem
from sdsengine.kernels import check_meta, compress_24, decompress_24

WGMMA_PIPELINES = {"wgmma": "plain", "wgmma_overlap": "overlap", "wgmma_tma": "tma",
                   "wgmma_tma_multicast": "tma_multicast"}  # backend -> pipeline of csrc/spmm24_sm90*.cu
BACKENDS = ("sdsengine", *WGMMA_PIPELINES, "cusparselt", "cutlass", "dense")
_SAME_FORM = dict.fromkeys(WGMMA_PIPELINES, "sdsengine")  # backends that run another's prepared form
ROWS_PER_TILE = 16  # m16n8k32: one warp tile of W rows
COLS_PER_BLOCK = 256  # 8 k-steps of 32: one 16-byte metadata load per lane
PAD_META = 0x44444444  # every group "keeps" columns 0 and 1 (valid, ordered) of an all-zero pad
LOCKS = 4096  # split-K tickets per prepared weight; automatic split-K needs fewer than 4 x (number of SMs)

log = logging.getLogger("sdsengine")
# the CUDA sources for a JIT build: in a wheel, package data; in a source checkout, csrc/ beside the package
_CSRC = next((d for d in (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc")
              if (d / "bindings.cpp").is_file()), Path(__file__).resolve().parent.parent / "csrc")
_extension = {"module": None, "error": None, "tried": False}


class BackendUnavailable(RuntimeError):
    """A backend cannot run this weight here (device, dtype, shape or a missing library)."""


# ---------------------------------------------------------------------------------------------------
# Layout: canonical compress_24 -> the fragment order of csrc/spmm24_sm80.cu (offline, any device)
# ---------------------------------------------------------------------------------------------------

def reorder_24(values, meta):
    """Canonical (values, meta) -> (values [Mt, KB*8, 32, 8], meta int32 [Mt, KB, 32, 4]) for the kernel.

    Rows are padded to Mt*16 and K to KB*256 with zero weights. mma.sp m16n8k32 hands lane (g, t) of a
    16x32 tile the kept pairs of groups t and t+4 of rows g and g+8: values[mt, ks, lane] is those four
    pairs, one 16-byte load. Metadata: the lanes that selector s names (t // 2 == s) hold, for k-step
    2q+s, the 16-bit half t % 2 of row g (low) and row g+8 (high); word q of a lane's 16 bytes.
    """
    rows, half = values.shape
    cols = half * 2
    mt, kb = -(-rows // ROWS_PER_TILE), -(-cols // COLS_PER_BLOCK)
    pad_rows, pad_cols = mt * ROWS_PER_TILE - rows, kb * COLS_PER_BLOCK - cols
    v = F.pad(values, (0, pad_cols // 2, 0, pad_rows))
    m = F.pad(meta, (0, pad_cols // 32, 0, pad_rows), value=PAD_META)
    # value index: row = (mt, h, g), compressed column = (ks, half, t, e) -> (mt, ks, g, t, half, h, e)
    v = v.reshape(mt, 2, 8, kb * 8, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6)
    # metadata half-words: row = (mt, h, g), half-word = (kb, q, sel, khalf) -> (mt, kb, g, sel, khalf, q, h)
    m16 = m.contiguous().view(torch.int16).reshape(mt, 2, 8, kb, 4, 2, 2).permute(0, 3, 2, 5, 6, 4, 1)
    m32 = m16.contiguous().view(torch.int32)
    return v.reshape(mt, kb * 8, 32, 8).contiguous(), m32.reshape(mt, kb, 32, 4).contiguous()


def unreorder_24(values_r, meta_r, rows, cols):
    """Inverse of reorder_24: the canonical (values, meta) of a (rows, cols) weight, padding dropped."""
    mt, kb = values_r.shape[0], meta_r.shape[1]
    if values_r.shape != (mt, kb * 8, 32, 8) or meta_r.shape != (mt, kb, 32, 4) or \
            mt != -(-rows // ROWS_PER_TILE) or kb != -(-cols // COLS_PER_BLOCK):
        raise ValueError(f"unreorder_24: values {tuple(values_r.shape)} and meta {tuple(meta_r.shape)} are not "
                         f"reorder_24's form of a ({rows}, {cols}) weight")
    # the permutations of reorder_24, undone: (mt, ks, g, t, half, h, e) -> (mt, h, g, ks, half, t, e)
    v = values_r.reshape(mt, kb * 8, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6)
    # (mt, kb, g, sel, khalf, q, h) -> (mt, h, g, kb, q, sel, khalf)
    m16 = meta_r.contiguous().view(torch.int16).reshape(mt, kb, 8, 2, 2, 4, 2).permute(0, 6, 2, 1, 5, 3, 4)
    m = m16.contiguous().view(torch.int32).reshape(mt * ROWS_PER_TILE, kb * COLS_PER_BLOCK // 32)
    v = v.reshape(mt * ROWS_PER_TILE, kb * COLS_PER_BLOCK // 2)
    return v[:rows, :cols // 2].contiguous(), m[:rows, :cols // 32].contiguous()


# ---------------------------------------------------------------------------------------------------
# The extension: pre-built sdsengine._C, else a JIT build from csrc/ where CUDA can build it
# ---------------------------------------------------------------------------------------------------

def load_extension():
    """The compiled module (or None; extension_error() says why). Tried once per process."""
    if not _extension["tried"]:
        _extension["tried"] = True
        try:
            from sdsengine import _C
            _extension["module"] = _C
        except ImportError as exc:
            _extension["module"], _extension["error"] = _jit_build(f"no pre-built sdsengine._C ({exc})")
    return _extension["module"]


def extension_error():
    load_extension()
    return _extension["error"]


def _jit_build(why_not_prebuilt):
    """JIT-compile csrc/ for the visible GPU (minutes, once; cached by torch). SDSENGINE_JIT=0 turns it off."""
    from torch.utils.cpp_extension import CUDA_HOME
    sources = [_CSRC / "bindings.cpp", *sorted(_CSRC.glob("*.cu"))]
    reasons = {
        "SDSENGINE_JIT=0": os.environ.get("SDSENGINE_JIT") == "0",
        "no CUDA device": not torch.cuda.is_available(),
        "torch has no CUDA": torch.version.cuda is None,
        "no CUDA toolkit (CUDA_HOME / nvcc)": CUDA_HOME is None,
        f"sources not found in {_CSRC}": len(sources) < 2 or not all(s.exists() for s in sources),
    }
    blocked = [text for text, hit in reasons.items() if hit]
    if not blocked and (too_old := toolkit_problem(CUDA_HOME)):
        blocked.append(too_old)
    if blocked:
        return None, f"{why_not_prebuilt}; no JIT build: {', '.join(blocked)}"
    try:
        return _jit_load(sources), None
    except Exception as exc:  # a failed build must leave the other backends usable
        return None, f"{why_not_prebuilt}; JIT build failed: {exc}"


def _jit_load(sources):
    """torch's JIT build (or its cached result) under a lock of ours. torch guards a build with a lock file
    that outlives a build killed in its minutes of nvcc (Ctrl-C, the OOM killer), and every later process
    then waits for it forever, silently. Ours is a flock, which the kernel drops with its process: whoever
    holds it is alive, so a torch lock found by its holder was left by a dead build (or by a build that
    takes no lock of ours: an older sdsengine, a manual torch load of the same name)."""
    from torch.utils import cpp_extension
    build = Path(cpp_extension._get_build_directory("sdsengine_C", verbose=False))
    with open(build / "sdsengine.flock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building: wait for it, then use its build
            log.warning("sdsengine: waiting for another process's build of the CUDA extension in %s", build)
            fcntl.flock(held, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("sdsengine: removing %s, left by a CUDA extension build that was stopped", stale)
            stale.unlink(missing_ok=True)
        log.warning("sdsengine: building the CUDA extension from %s in %s (first use only; takes a few minutes)",
                    _CSRC, build)
        return cpp_extension.load(name="sdsengine_C", sources=[str(s) for s in sources], build_directory=str(build),
                                  extra_cflags=["-O3"], extra_cuda_cflags=list(NVCC_FLAGS), verbose=False)


# ---------------------------------------------------------------------------------------------------
# Capability probe
# ---------------------------------------------------------------------------------------------------

def _why_not(backend, device, dtype):
    """None if `backend` can run here, else the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "dense":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, got {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs compute capability >= 8.0 (sparse tensor cores), device has {major}.{minor}"
    if backend == "sdsengine":
        return None if load_extension() is not None else extension_error()
    if backend in WGMMA_PIPELINES:
        if (major, minor) != (9, 0):
            return f"needs compute capability 9.0 (wgmma.sp is sm_90a code), device has {major}.{minor}"
        return extension_error() if load_extension() is None else wgmma_error(backend)
    if backend == "cusparselt":
        ok = hasattr(torch.backends, "cusparselt") and torch.backends.cusparselt.is_available()
        return cusparselt_error() if ok else "this PyTorch build has no cuSPARSELt"
    # cutlass, the last of BACKENDS
    return None if major == 8 else f"PyTorch's CUTLASS 2:4 kernel needs compute capability 8.x, not {major}.{minor}"


# A failing kernel can leave an illegal instruction behind that kills the process's CUDA context for every
# later kernel (seen on an H100 with torch 2.11+cu130: cusparseLtMatmulSearch failed with an internal error on
# the transpose_result form). So a backend that has not yet run correctly on this machine is first
# self-checked once in a child process: cuSPARSELt, in each way of getting the (tokens, out) product until
# one passes ("transposed": transpose_result=True writes it directly; "plain": W·Xᵀ, then one transposing
# copy), and each pipeline of our wgmma.sp kernel (all in one child; one that kills it fails alone, and a
# new child checks the rest). SDSENGINE_CUSPARSELT / SDSENGINE_WGMMA = 1 skips the check, 0 turns the
# backend(s) off; SDSENGINE_CUSPARSELT_FORM names the form to use without checking; SDSENGINE_WGMMA may also
# list the pipelines to use unchecked (`wgmma,wgmma_overlap`: the others off). checked_switches() gives the
# settings that carry this process's check results to another, so a chain of processes checks once.
CUSPARSELT_FORMS = ("transposed", "plain")
_CHILD_CHECK = """
import os, torch
os.environ.update({env!r})
from sdsengine import ops
status = ops._self_check_dtypes({backend!r})
assert status == "ok", status
"""
CHILD_CHECK_DTYPES = (torch.float16, torch.bfloat16)  # the dtypes the checked backends run in
_cusparselt = {}
_wgmma = {}


def _checked_in_child(backend, variable, cache, variants):
    """None if `backend` passed its self-check in a child process in one of `variants`
    ({name: (what, environment)}), tried in order once per process, else why not; the passing name goes
    into cache["passed"]. The on/off `variable` decides without a check."""
    switch = _switched(variable)
    if switch is not None:
        return switch or None
    if "error" not in cache:
        reasons = []
        for name, (what, env) in variants.items():
            reason = _run_check(_CHILD_CHECK.format(env=env, backend=backend), what)
            if reason is None:
                cache["passed"] = name
                break
            reasons.append(reason)
        cache["error"] = None if "passed" in cache else "; ".join(reasons)
    return cache["error"]


def _switched(variable):
    """The on/off environment switch of a checked backend: "" for on (=1), why not for off (=0), None when
    unset (then the child check decides)."""
    wanted = os.environ.get(variable)
    if wanted not in ("0", "1"):
        return None
    return "" if wanted == "1" else f"turned off by {variable}=0"


def cusparselt_error():
    """None if cuSPARSELt ran a small product correctly in a child process in one of its forms (checked
    once), else why not."""
    forms = {form: (f"cuSPARSELt ({form} form)", {"SDSENGINE_CUSPARSELT": "1", "SDSENGINE_CUSPARSELT_FORM": form})
             for form in CUSPARSELT_FORMS}
    return _checked_in_child("cusparselt", "SDSENGINE_CUSPARSELT", _cusparselt, forms)


_WGMMA_CHILD = """
import os, sys, torch
os.environ["SDSENGINE_WGMMA"] = "1"
from sdsengine import ops
backends = sys.argv[2:]
for i in range(int(sys.argv[1]), len(backends)):
    print("CASE", i, flush=True)
    print("RESULT", i, ops._self_check_dtypes(backends[i]), flush=True)
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        os._exit(3)  # the CUDA context is lost: a new child checks the rest
"""


def wgmma_error(backend="wgmma"):
    """None if this pipeline of our wgmma.sp kernel ran a small product correctly in a child process
    (all pipelines are checked together, once), else why not: it has not yet run on hardware as often as
    the mma.sp kernel."""
    switch = _wgmma_switch(backend)
    if switch is not None:
        return switch or None
    if backend not in _wgmma:
        _wgmma.update(_check_wgmma_pipelines())
    return _wgmma[backend]


def _wgmma_switch(backend):
    """_switched's answer for SDSENGINE_WGMMA, which may also name the pipelines to use unchecked."""
    wanted = os.environ.get("SDSENGINE_WGMMA")
    if wanted is None or wanted in ("0", "1"):
        return _switched("SDSENGINE_WGMMA")
    names = {name.strip() for name in wanted.split(",")}
    if not names <= set(WGMMA_PIPELINES):
        raise ValueError(f"SDSENGINE_WGMMA must be 0, 1 or a comma-separated list of {tuple(WGMMA_PIPELINES)}, "
                         f"got {wanted!r}")
    return "" if backend in names else f"turned off by SDSENGINE_WGMMA={wanted}"


def checked_switches():
    """The environment settings that give another process this one's child-check results without checking
    again: {} for a backend not checked here (none ran, or a switch decided)."""
    settings = {}
    if "error" in _cusparselt:
        passed = _cusparselt.get("passed")
        settings["SDSENGINE_CUSPARSELT"] = "1" if passed else "0"
        if passed:
            settings["SDSENGINE_CUSPARSELT_FORM"] = passed
    if set(_wgmma) == set(WGMMA_PIPELINES):
        settings["SDSENGINE_WGMMA"] = wgmma_setting(b for b in WGMMA_PIPELINES if _wgmma[b] is None)
    if "cusparselt" in _captures:
        settings["SDSENGINE_CUSPARSELT_GRAPHS"] = "0" if _captures["cusparselt"] else "1"
    return settings


def wgmma_setting(backends):
    """The SDSENGINE_WGMMA value that turns on exactly these wgmma pipelines, unchecked (the form
    _wgmma_switch reads)."""
    return ",".join(backends) or "0"


# Every child check (cuSPARSELt's, the wgmma pipelines', a library's capture) takes seconds; a hang is a failure
# after this long, so that it cannot hold a short GPU lease (the GPU suite's `versions` step runs all of them)
CHECK_TIMEOUT_S = 60


def _check_wgmma_pipelines():
    """All pipelines' self-checks in one child; one that ends the child fails alone (sdsengine.isolated)."""
    backends = list(WGMMA_PIPELINES)
    results = isolated.run_isolated(_WGMMA_CHILD, backends, timeout_s=CHECK_TIMEOUT_S)
    return {b: None if results[i] == "ok" else _wgmma_failure(b, results[i]) for i, b in enumerate(backends)}


def _wgmma_failure(backend, why):
    return f"wgmma.sp kernel ({WGMMA_PIPELINES[backend]} pipeline) failed its self-check in a child process: {why}"


def cusparselt_form():
    """The form cuSPARSELt runs in: SDSENGINE_CUSPARSELT_FORM, else the first that passed its check."""
    form = os.environ.get("SDSENGINE_CUSPARSELT_FORM") or _cusparselt.get("passed", CUSPARSELT_FORMS[0])
    if form not in CUSPARSELT_FORMS:
        raise ValueError(f"SDSENGINE_CUSPARSELT_FORM must be one of {CUSPARSELT_FORMS}, got {form!r}")
    return form


def _run_check(code, what):
    """None if `code` ran cleanly in a child process, else why not, naming `what` was checked."""
    _, failure = isolated.run_child(code, timeout_s=CHECK_TIMEOUT_S)
    return None if failure is None else f"{what} failed its self-check in a child process: {failure}"


def available(device, dtype):
    """Backends that can run on `device` in `dtype`, in order of preference."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_not(b, device, dtype) is None]


def probe(device=None, dtype=torch.float16, self_check=False):
    """{'device', 'name', 'capability', 'backends': {backend: 'ok' | reason}}.

    self_check runs a small 2:4 matmul through every available backend against an fp32 dense reference and
    reports a backend that disagrees as failed (cuSPARSELt has shipped wrong-result algorithms).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"device": str(device), "name": "cpu", "capability": None}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    info["backends"] = {b: _why_not(b, device, dtype) or "ok" for b in BACKENDS}
    if self_check:
        for backend, status in info["backends"].items():
            if status == "ok":
                info["backends"][backend] = _self_check(backend, device, dtype)
    if info["backends"]["cusparselt"] == "ok":
        info["cusparselt_form"] = cusparselt_form()
    return info


MATCHES_DENSE = 2e-2  # the relative error against dense under which a backend's product counts as right
SELF_CHECK_SHAPES = ((272, 1024), (200, 800), (256, 512))  # several tiles each way and K over several
# pipeline stages; then rows ending inside a 16-row tile and K ending inside a 256-column block (our kernels'
# padding); then a shape within the libraries' own limits (cuSPARSELt: rows and cols % 16; CUTLASS: rows
# % 32, cols % 64), which refuse the first two


def _self_check_dtypes(backend):
    """The child processes' check: _self_check on the GPU in each of CHILD_CHECK_DTYPES, "ok" or the first
    failure with its dtype."""
    for dtype in CHILD_CHECK_DTYPES:
        status = _self_check(backend, torch.device("cuda"), dtype)
        if status != "ok":
            return f"{dtype}: {status}"
    return "ok"


def _self_check(backend, device, dtype):
    """A decode-sized product and a prefill-sized one with a bias, for each of SELF_CHECK_SHAPES the backend
    takes: a shape it refuses (BackendUnavailable, a library's shape limit) is one SparseLinear does not
    give it either, but at least one must run."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for rows, cols in SELF_CHECK_SHAPES:
        values, meta = compress_24(torch.randn(rows, cols, generator=g))
        try:
            form = prepare(backend, values.to(device, dtype), meta.to(device))
        except BackendUnavailable:
            continue
        except Exception as exc:  # a probe reports, it does not raise
            return f"failed: {type(exc).__name__}: {exc}"
        for tokens, bias in ((5, None), (300, torch.randn(rows, generator=g))):
            x = torch.randn(tokens, cols, generator=g)
            ref = F.linear(x, decompress_24(values, meta), bias)
            try:
                y = run(backend, form, x.to(device, dtype), None if bias is None else bias.to(device, dtype), rows)
            except Exception as exc:
                return f"failed: {type(exc).__name__}: {exc}"
            err = relative_error(y.float().cpu(), ref)
            if not err < MATCHES_DENSE:
                return (f"failed: relative error {err:.3g} against dense fp32 at {rows}x{cols}, {tokens} tokens"
                        f"{'' if bias is None else ', with a bias'}")
        checked += 1
    return "ok" if checked else f"failed: it takes none of the self-check shapes {SELF_CHECK_SHAPES}"


# A layer set for CUDA graphs (SparseLinear.graphs) chooses only among backends whose calls can be captured and
# replayed. Ours and dense launch kernels alone (our kernel's capture is a GPU test); a library's call (cuSPARSELt
# builds a plan and takes a workspace on every call) is first captured once in a child process, never in this
# one: a capture that fails can leave torch's allocator believing a capture is still under way (fixed in torch
# 2.12, pytorch#180395), and a later synchronize then ends the process. SDSENGINE_CUSPARSELT_GRAPHS=1 or 0 decides
# for cuSPARSELt without the check; checked_switches() passes the result on.
CAPTURE_CHECKED = ("cusparselt", "cutlass")
_CAPTURE_CHILD = """
import os
os.environ.update({env!r})
from sdsengine import ops
ops._capture_check({backend!r})
"""
_captures = {}


def capture_error(backend):
    """None if a layer set for CUDA graphs may choose `backend`: its call, captured and replayed, matches dense
    (checked once per process for the library backends), else why not."""
    if backend not in CAPTURE_CHECKED:
        return None
    switch = _switched("SDSENGINE_CUSPARSELT_GRAPHS") if backend == "cusparselt" else None
    if switch is not None:
        return switch or None
    if backend not in _captures:
        env = {"SDSENGINE_CUSPARSELT": "1", "SDSENGINE_CUSPARSELT_FORM": cusparselt_form()}
        code = _CAPTURE_CHILD.format(env=env, backend=backend)
        _, failure = isolated.run_child(code, timeout_s=CHECK_TIMEOUT_S)
        _captures[backend] = None if failure is None else (
            f"{backend}'s call failed its CUDA-graph capture in a child process: {failure}")
        if failure is not None:
            log.warning("sdsengine: %s; layers set for CUDA graphs do not use it", _captures[backend])
    return _captures[backend]


def _capture_check(backend, rows=256, cols=512, tokens=16):
    """The child's check: `backend` on a random 2:4 fp16 weight, called once eagerly (its one-off work: a form, an
    algorithm search), captured as torch.cuda.graph captures, replayed on a new input; raises unless the replay
    matches dense."""
    g = torch.Generator().manual_seed(0)
    values, meta = compress_24(torch.randn(rows, cols, generator=g))
    form = prepare(backend, values.to("cuda", torch.float16), meta.cuda())
    x = torch.randn(tokens, cols, generator=g).to("cuda", torch.float16)
    run(backend, form, x, None, rows)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run(backend, form, x, None, rows)
    x.copy_(torch.randn(tokens, cols, generator=g))
    graph.replay()
    err = relative_error(y.float().cpu(), F.linear(x.float().cpu(), decompress_24(values, meta).half().float()))
    if not err < MATCHES_DENSE:
        raise AssertionError(f"{backend} replayed from a CUDA graph differs from dense: relative error {err:.3g}")


def relative_error(y, ref):
    if y.shape != ref.shape:  # broadcasting would compare something else
        raise ValueError(f"relative_error: shapes differ, {tuple(y.shape)} against {tuple(ref.shape)}")
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------
# prepare / run per backend
# ---------------------------------------------------------------------------------------------------

def form_key(backend):
    """Backends with equal keys run the same prepared form, so a layer holds one copy of it."""
    return _SAME_FORM.get(backend, backend)


def prepare(backend, values, meta):
    """The backend's own form of a compressed weight; raises BackendUnavailable where it cannot run."""
    reason = _why_not(backend, values.device, values.dtype)
    if reason:
        raise BackendUnavailable(f"{backend}: {reason}")
    if form_key(backend) == "sdsengine":  # zeroed tickets per stream (locks), which the mma.sp kernel leaves
        # zeroed: no memset per call; and the split-K chosen per token count (split_k), kept with the weight
        # so a call only looks it up
        check_meta(meta, f"prepare({backend!r})")  # the kernels trust the metadata's order
        return (*reorder_24(values, meta), {}, {})
    dense = decompress_24(values, meta)
    if backend == "dense":
        return dense
    try:  # the libraries have their own shape constraints (CUTLASS fp16: rows % 32, cols % 64)
        if backend == "cusparselt":
            return _cusparselt_state(torch._cslt_compress(dense))
        from torch.sparse import SparseSemiStructuredTensorCUTLASS
        return SparseSemiStructuredTensorCUTLASS.from_dense(dense)
    except (RuntimeError, ValueError) as exc:
        raise BackendUnavailable(f"{backend}: {exc}") from exc


def run(backend, form, x, bias, out_features):
    """Y (..., out_features) = x (..., K) · Wᵀ + bias with a prepared form. Dense takes x as it is (no reshape:
    a host-bound eager prefill pays for every view); the others see it as (tokens, K)."""
    if backend == "dense":  # the form: the dense weight, or (a lean layer's) a function that decompresses it
        return F.linear(x, form() if callable(form) else form, bias)
    if x.dim() == 2:
        return _run_rows(backend, form, x, bias, out_features)
    y = _run_rows(backend, form, x.reshape(-1, x.shape[-1]), bias, out_features)
    return y.reshape(*x.shape[:-1], out_features)


def _run_rows(backend, form, x, bias, out_features):
    """run on x (N, K), for the backends other than dense."""
    if backend == "sdsengine":
        values_r, meta_r, locks, splits = form
        x = _aligned(x)
        kept = splits.get(x.shape[0])  # (generation, split): one cleared since is stale
        if kept is not None and kept[0] == _split_generation[0]:
            split = kept[1]
        else:
            split = split_k(form, x, bias, out_features)
            if not capturing():  # inside capture it is the plan's own, untimed: choose again after
                splits[x.shape[0]] = (_split_generation[0], split)
        return load_extension().spmm24(x, values_r, meta_r, out_features, bias, split, stream_locks(locks, x))
    if backend in WGMMA_PIPELINES:
        values_r, meta_r = form[:2]
        return load_extension().spmm24_sm90(_aligned(x), values_r, meta_r, out_features, bias, 0,
                                            WGMMA_PIPELINES[backend])
    if backend == "cusparselt":
        return _run_cusparselt(form, x, bias)
    return F.linear(x, form, bias)  # cutlass: PyTorch's subclass dispatches (and pads) itself


# Split-K of the mma.sp kernel, per weight shape and token count. The kernel's own plan (split_k 0) aims at
# the blocks per SM its registers allow (ctas_per_sm), from a formula; how much that leaves on the table (a partial last wave, the
# slices' reduction) depends on the GPU, so the splits that give other plans are timed once per shape and
# token count, like cuSPARSELt's algorithm, and the fastest is kept unless the plan's own is within
# SPLIT_MARGIN of it. Only up to SPLIT_SEARCH_TOKENS tokens, the decode regime this kernel is for (from 128
# tokens on dense wins on the H100, and a search there would cost whole milliseconds per token count).
# SDSENGINE_SPLIT_K=N fixes N without timing (0: the plan's own), in the same decode regime; like the timed
# choice, it is read when a prepared weight first meets a token count, and kept in the weight's form from
# then on. Each split sums in a fixed order, but two splits round differently: fix N where outputs must
# match bit for bit across runs.
SPLIT_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
SPLIT_MARGIN = 0.03
SPLIT_SEARCH_TOKENS = 64
_splits = {}  # (out_features, in_features, tokens, dtype, device, bias) -> split_k
_split_generation = [0]  # bumped by clear_split_choices, so the copies kept in forms are chosen again


def stream_locks(locks, x):
    """The split-K tickets of one prepared weight for calls on the current stream. Two calls on different
    streams may run at once, and tickets shared between them would mix the two launches' slices (and leave
    the tickets non-zero for every later call), so each stream has its own. A CUDA graph is captured on a
    side stream but replays on the stream it is launched on, usually the one that warmed the layer up: in
    capture the tickets of a stream already seen are baked in, since new ones would add a memset to every
    replay (one per linear, in every decode step)."""
    stream = _stream_id(x.device)
    if stream not in locks:
        if locks and capturing():
            return next(iter(locks.values()))
        locks[stream] = torch.zeros(LOCKS, dtype=torch.int32, device=x.device)
    return locks[stream]


# the current stream's handle in one C call; torch.cuda.current_stream builds a Stream object each time (a few
# us on every decode call of every linear). Private to torch: where a build lacks it, the public call
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_id(device):
    if device.type != "cuda":
        return None
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def split_k(form, x, bias, out_features):
    """The split_k for this call: SDSENGINE_SPLIT_K, else the one timed fastest for this shape and token count
    (timed on first use; the plan's own inside CUDA-graph capture, where nothing may be timed)."""
    if not 0 < x.shape[0] <= SPLIT_SEARCH_TOKENS:  # no rows: nothing to launch, and no plan to time; past the
        return 0  # decode regime a fixed split would only cost workspace (splits x N x M floats) and time
    fixed = os.environ.get("SDSENGINE_SPLIT_K")
    if fixed is not None:
        if not fixed.isdigit():
            raise ValueError(f"SDSENGINE_SPLIT_K must be a whole number (0: the kernel's own plan), got {fixed!r}")
        return int(fixed)
    key = (out_features, x.shape[1], x.shape[0], x.dtype, x.device, bias is not None)
    if key not in _splits:
        if capturing():
            return 0
        _splits[key] = search_split(form, x, bias, out_features)
    return _splits[key]


def search_split(form, x, bias, out_features, x_buffers=1):
    """The fastest split_k among those giving distinct plans, the plan's own (0) unless beaten by SPLIT_MARGIN.
    x_buffers: the decode kernel's X buffers (csrc/spmm24.h; 2 is an experiment, benchmarks/sweep_decode.py)."""
    values_r, meta_r, locks, _ = form
    ext = load_extension()
    own = ext.spmm24_plan(x, out_features, 0, x_buffers)["splits"]
    by_plan = {own: 0}
    for s in SPLIT_CANDIDATES:
        by_plan.setdefault(ext.spmm24_plan(x, out_features, s, x_buffers)["splits"], s)
    locks = stream_locks(locks, x)
    times = {s: time_ms(lambda s=s: ext.spmm24(x, values_r, meta_r, out_features, bias, s, locks, x_buffers),
                        warmup=2, iters=10, device=x.device) for s in by_plan.values()}
    best = min(times, key=times.get)
    return best if times[best] < times[0] * (1 - SPLIT_MARGIN) else 0


# ---------------------------------------------------------------------------------------------------
# Grouped: one launch for a mixture's experts, routing read on the device (sdsengine.nn.grouped)
# ---------------------------------------------------------------------------------------------------

def grouped_form(canonicals):
    """The grouped kernel's form of E experts' weights of one shape, from their canonical (values, meta) pairs:
    each expert's reorder_24 form, stacked ([E, Mt, ...]), and per-stream split-K tickets."""
    forms = []
    for e, (values, meta) in enumerate(canonicals):
        check_meta(meta, f"grouped_form(expert {e})")  # the kernel trusts the metadata's order
        forms.append(reorder_24(values, meta))
    return torch.stack([f[0] for f in forms]), torch.stack([f[1] for f in forms]), {}


def run_grouped(form, x, offsets, groups, max_rows, bias, out_features, typical_rows=None):
    """Y (R, out_features): for each expert e in groups (-1: none), x's rows offsets[e]:offsets[e + 1] (at most
    max_rows) times W_e^T + bias[e]; zeros in rows no listed expert owns. The kernel's own split-K plan: a timed
    choice, as single weights get, would need the routing on the host. Its token tile is sized for typical_rows
    (default: even_rows); blocks cover max_rows all the same."""
    values_r, meta_r, locks = form
    if typical_rows is None:
        typical_rows = even_rows(x, groups, max_rows)
    return load_extension().spmm24_grouped(_aligned(x), values_r, meta_r, offsets, groups, out_features, max_rows,
                                           bias, 0, stream_locks(locks, x), typical_rows)


def even_rows(x, groups, max_rows):
    """The rows each listed group of a grouped call gets when the routing is even: known from the shapes, so
    sizing the kernel's token tile by it reads nothing back."""
    return min(max_rows, -(-x.shape[0] // max(groups.shape[0], 1)))


def grouped_reference(x, weights, offsets, groups, max_rows, bias=None):
    """run_grouped's contract in plain PyTorch (fp32 accumulation), from dense weights [E, M, K]: for tests."""
    y = torch.zeros(x.shape[0], weights.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in groups.tolist():
        if e < 0:
            continue
        start, stop = bounds[e], min(bounds[e + 1], bounds[e] + max_rows, x.shape[0])
        y[start:stop] = x[start:stop].float() @ weights[e].float().T
        if bias is not None:
            y[start:stop] += bias[e].float()
    return y.to(x.dtype)


def split_choices():
    """{(out_features, in_features, tokens, dtype, device, bias): split_k} chosen so far in this process."""
    return dict(_splits)


def clear_split_choices():
    _splits.clear()
    _split_generation[0] += 1


def _aligned(x):
    """x contiguous and 16-byte aligned: our kernels copy X with 16-byte cp.async."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


def _cusparselt_state(packed):
    """cuSPARSELt's prepared form: the packed weight, its algorithm per token count (searched on first use)
    and the result form, fixed when the weight is prepared (not looked up per call)."""
    return {"packed": packed, "alg": {}, "transposed": cusparselt_form() == "transposed"}


def _run_cusparselt(form, x, bias):
    """cuSPARSELt wants the token dim padded to 8; the (tokens, out) result comes straight out in the
    transposed form, and is copied out of W·Xᵀ in the plain one."""
    n = x.shape[0]
    pad = -n % 8
    # contiguous: torch reads a non-contiguous operand as the transposed layout, not by its strides
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    transposed = form["transposed"]
    alg = form["alg"].get(n + pad)
    if alg is None:
        alg = _search_alg(form["packed"], xp, bias, transposed)
        if not capturing():  # inside capture alg 0 stands in, unsearched: search again after
            form["alg"][n + pad] = alg
    y = torch._cslt_sparse_mm(form["packed"], xp.t(), bias=bias, transpose_result=transposed, alg_id=alg)
    y = y if transposed else y.t().contiguous()
    return y[:n] if pad else y


def _search_alg(packed, xp, bias, transposed):
    """Searched once per token count; the search cannot run inside CUDA-graph capture, default alg 0 there."""
    if capturing():
        return 0
    try:
        return int(torch._cslt_sparse_mm_search(packed, xp.t(), bias=bias, transpose_result=transposed))
    except (RuntimeError, AttributeError):
        return 0


def capturing():
    """True inside CUDA-graph capture, where nothing may be timed, searched or synchronized."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def spmm24(x, values, meta, bias=None, backend="auto"):
    """One-shot Y = X·Wᵀ (+ bias) from canonical (values, meta); prepares every call, so use SparseLinear
    where the weight is reused. backend='auto' takes the first available in BACKENDS order."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if backend == "auto":
        backend = available(x.device, x.dtype)[0]
    form = prepare(backend, values, meta)
    return run(backend, form, x2, bias, values.shape[0]).reshape(*shape[:-1], values.shape[0])


# ---------------------------------------------------------------------------------------------------
# Timing, shared by the autotuner and `sdsengine bench`
# ---------------------------------------------------------------------------------------------------

_flush_buffers = {}


def flush_l2(device):
    """Overwrite the L2 cache, so the next kernel reads its weights from HBM as a real decode step does."""
    device = torch.device(device)
    if device not in _flush_buffers:
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        _flush_buffers[device] = torch.empty(2 * size, dtype=torch.uint8, device=device)
    _flush_buffers[device].zero_()


HOST_COVER_CYCLES = 2_000_000  # about 1 ms of GPU clock: longer than any call's host work here


def time_ms(fn, warmup=3, iters=20, flush=True, hide_host=False, device=None):
    """Median milliseconds of fn() on `device`'s current stream (default: the current device), timed with CUDA
    events (L2 flushed before each). Give the device fn's tensors are on: events, flush and spin are issued on
    it, so a weight on another GPU than the current one is still timed where its work runs.

    The events time what the GPU does between them, including any wait for the host to launch fn's work:
    a call whose host side (Python, checks, the launch) outlasts the GPU's queue is timed with it, as in
    eager use. hide_host: the GPU first spins for HOST_COVER_CYCLES, so fn's work is queued before the start
    event is reached and the GPU's own time is measured, as a CUDA graph would run it.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            if flush:
                flush_l2(device)
            if hide_host:
                torch.cuda._sleep(HOST_COVER_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)
