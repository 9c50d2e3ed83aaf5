"""Compile-only checks of csrc/ for machines with nvcc but no GPU (CI): the kernels for sm_80, sm_90 and
sm_90a with ptxas reporting no register spills, the wgmma.sp instructions present in the sm_90a image only,
the bindings against the installed torch headers, and every function the objects take from one another
defined once (what the extension's link and import need of our own code). All compilers run at once (about 25 s on 2 cores);
each test waits for its own. Skips cleanly without nvcc."""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import CUDA_HOME, include_paths

import sass_hazards

CSRC = Path(__file__).resolve().parent.parent / "csrc"
KERNELS = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90", "90a")  # the extension ships 80 and 90a (sdsengine/cuda_build.py); 90 is its PTX


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


NVCC = _nvcc()
CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")


def _torch_includes():
    flags = [f for path in include_paths() for f in ("-isystem", path)]
    if not Path(include_paths()[0], "c10/cuda/impl/cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheels ship c10/cuda without its generated header
    return flags


def _cuda_include():
    """nvcc may be a wrapper script, so look where toolkits live as well as next to it."""
    homes = [CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(NVCC).resolve().parent.parent)]
    found = [Path(h, "include") for h in homes if h and Path(h, "include", "cuda_runtime.h").exists()]
    return str(found[0]) if found else None


def _commands(out):
    cuda_include = _cuda_include()
    commands = {}
    for source in KERNELS:
        for arch in ARCHS:
            commands[f"{source.name}-sm_{arch}"] = [
                NVCC, "-c", str(source), "-o", str(out / f"{source.stem}_{arch}.o"), "-std=c++17", "-O3",
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-Werror", "all-warnings",
                *_torch_includes()]
    if CXX and cuda_include:
        commands["bindings.cpp"] = [
            CXX, "-std=c++17", "-c", "-O0", "-o", str(out / "bindings.o"), "-Wall", "-Wextra", "-Werror",
            *_torch_includes(),
            "-isystem", sysconfig.get_paths()["include"], "-isystem", cuda_include,
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", str(CSRC / "bindings.cpp")]
    return commands


@pytest.fixture(scope="module")
def compilers(tmp_path_factory):
    out = tmp_path_factory.mktemp("csrc")
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in _commands(out).items()}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(proc):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{output}"
    return output


def test_there_are_kernels():
    assert KERNELS, f"no .cu files in {CSRC}"


@pytest.mark.parametrize("target", [f"{k.name}-sm_{a}" for k in KERNELS for a in ARCHS])
def test_kernels_compile_without_spills(compilers, target):
    output = _finish(compilers[target])
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
    assert spills and not any(spills), f"register spills in {target}:\n{output}"


def _cuobjdump():
    """The toolkit's, else the one Triton ships (CI's toolkit has nvcc alone)."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import triton
        except ImportError:
            return None
        found = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(found) if Path(found).exists() else None


_DISASSEMBLED = {}  # object file -> its SASS: two tests read each Hopper object


def _sass(compilers, target):
    """(ptxas output, SASS text) of one compiled target, or a skip without a cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither the CUDA toolkit's nor Triton's)")
    proc = compilers[target]
    output = _finish(proc)
    obj = proc.args[proc.args.index("-o") + 1]
    if obj not in _DISASSEMBLED:
        _DISASSEMBLED[obj] = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, check=True).stdout
    return output, _DISASSEMBLED[obj]


HOPPER = ("spmm24_sm90.cu", "spmm24_sm90_tma.cu")


@pytest.mark.parametrize("source", HOPPER)
@pytest.mark.parametrize("arch", ARCHS)
def test_wgmma_sp_only_in_the_sm90a_image(compilers, source, arch):
    """The Hopper kernels' sparse warpgroup MMAs (HGMMA.SP in SASS) are there in sm_90a, at the two
    selectors of each stage, for every tile width and both dtypes; other images hold the trapping stub and no
    HGMMA at all. ptxas neither serialized the wgmmas (C7515, C7512) nor spilled."""
    output, sass = _sass(compilers, f"{source}-sm_{arch}")
    mmas = re.findall(r"HGMMA\.SP\.64x(\d+)x32\.F32(\.BF16)? [^;]*, (0x[01])", sass)
    if arch != "90a":
        assert "HGMMA" not in sass, f"sm_{arch} image has warpgroup MMAs"
        return
    assert "C7515" not in output and "C7512" not in output, f"ptxas serialized the wgmmas:\n{output}"
    tiles = {(int(n), ty or ".F16") for n, ty, _ in mmas}
    assert tiles == {(n, ty) for n in (64, 128, 256) for ty in (".F16", ".BF16")}, tiles
    assert {sel for *_, sel in mmas} == {"0x0", "0x1"}
    waits = set(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[01])", sass))
    if source == "spmm24_sm90.cu":
        assert waits == {"0x0", "0x1"}, waits  # the plain pipeline waits for all, the overlapped one leaves one
    else:
        assert waits == {"0x0"}, waits
        for op in ("UTMALDG.2D ", "UTMALDG.2D.MULTICAST", "UBLKCP.S.G", "USETMAXREG.DEALLOC.CTAPOOL 0x28",
                   "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8", "UCGABAR_WAIT", "SYNCS.PHASECHK.TRANS64.TRYWAIT"):
            assert op in sass, f"no {op} in the TMA pipeline's SASS"
        # GPU-wide fences: in a clustered kernel only after the barriers' init and at the cluster barrier before
        # exit; a stage goes back to the peer block by a bare remote arrive (a cluster-scope release would fence)
        fences = [f.count("MEMBAR.ALL.GPU") for f in sass.split("Function : ")[1:]]
        assert max(fences) <= 2, f"GPU-wide fences per kernel: {fences}"


@pytest.mark.parametrize("source", HOPPER)
def test_no_wgmma_operand_register_reused_in_flight(compilers, source):
    """Every HGMMA group's A fragment and metadata registers stay untouched until a wait covers the group
    (tests/sass_hazards.py; on 11-30 it found the overlapped pipeline reloading an in-flight stage's metadata
    register at each 256-column block, fixed by a wait there)."""
    _, sass = _sass(compilers, f"{source}-sm_90a")
    functions = [f for f in sass.split("Function : ")[1:] if "HGMMA" in f]
    assert len(functions) == 12, len(functions)  # 3 tile widths x 2 dtypes x 2 pipelines (or cluster sizes)
    hazards = {f.split()[0][-60:]: sass_hazards.overwrites(f) for f in functions}
    assert not any(hazards.values()), {name: h for name, h in hazards.items() if h}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_decode_kernel_multiplies_from_three_resident_blocks(compilers, arch):
    """The mma.sp kernel's ring: its MMAs read their A fragments from three sets of 8 registers (a block each,
    the current one and the two in flight), not one set that every block is copied into: a copy waits for
    the block's loads, which left one block in flight per warp (SASS of 12-04: 36 SELs at the loop's end)."""
    _, sass = _sass(compilers, f"spmm24_sm80.cu-sm_{arch}")
    kernels = [f for f in sass.split("Function : ")[1:] if "spmm24_kernel" in f.split()[0]]
    assert len(kernels) == 8, len(kernels)  # 2 dtypes x 4 token tiles
    for kernel in kernels:
        fragments = set(re.findall(r"HMMA\.SP\.16832\.F32(?:\.BF16)? R\d+, (R\d+),", kernel))
        assert len(fragments) == 24, (kernel.split()[0], sorted(fragments))
        assert kernel.count("LDG.E.NA.128.CONSTANT") == 5 * 9, kernel.split()[0]  # 2 blocks first, 3 loop sites


def test_hazard_check_finds_a_write_across_a_loop_back_edge():
    """The check itself, on SASS shaped like the 11-30 finding: the loop's head rewrites the metadata register
    of the group left in flight by the loop's last stage."""
    sass = """
        /*0100*/                   IMAD.MOV.U32 R106, RZ, RZ, R7 ;
        /*0110*/                   LDS.128 R88, [R9+0x4000] ;
        /*0120*/                   HGMMA.SP.64x128x32.F32 R24, R88, gdesc[UR12], R24, R106, 0x1, gsb0 ;
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0140*/              @!P0 BRA 0x100 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0160*/                   EXIT ;
    """
    assert [(w, regs) for _, w, _, regs in sass_hazards.overwrites(sass)] == [(0x100, [106])]
    waited = sass.replace("LE gsb0, 0x1 ;", "LE gsb0, 0x0 ;")
    assert sass_hazards.overwrites(waited) == []


def test_bindings_compile_against_torch_headers(compilers):
    if "bindings.cpp" not in compilers:
        pytest.skip(f"no C++ compiler ({CXX}) or no CUDA headers ({_cuda_include()})")
    _finish(compilers["bindings.cpp"])



def _our_functions(obj):
    """(defined, needed): the global functions in namespace sdsengine that an object file defines and those it
    takes from elsewhere, by demangled name (nm)."""
    listing = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    entries = [re.match(r"^[0-9a-f]*\s+([A-Za-z])\s+(.*)$", line) for line in listing.splitlines()]
    ours = [(m[1], m[2]) for m in entries if m and m[2].startswith("sdsengine::")]
    return [name for kind, name in ours if kind == "T"], [name for kind, name in ours if kind == "U"]


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils)")
def test_every_function_the_objects_share_is_defined_once(compilers):
    """What linking sdsengine._C and importing it need of our own code: each sdsengine:: function that the
    bindings or a kernel file calls across files is defined in exactly one kernel file. A declaration in
    spmm24.h left without its definition (or defined twice) would otherwise show only on a GPU machine, as a
    failed import or link there."""
    if "bindings.cpp" not in compilers:
        pytest.skip(f"no C++ compiler ({CXX}) or no CUDA headers ({_cuda_include()})")
    objects = {"bindings.cpp": compilers["bindings.cpp"]} | {k.name: compilers[f"{k.name}-sm_90a"] for k in KERNELS}
    defined, needed = {}, {}
    for name, proc in objects.items():
        _finish(proc)
        defined[name], needed[name] = _our_functions(proc.args[proc.args.index("-o") + 1])
    assert needed["bindings.cpp"], "the bindings call no sdsengine:: function: is nm reading the object?"
    everywhere = [f for names in defined.values() for f in names]
    twice = {f for f in everywhere if everywhere.count(f) > 1}
    missing = {name: sorted(set(fs) - set(everywhere)) for name, fs in needed.items() if set(fs) - set(everywhere)}
    assert not twice and not missing, f"defined twice: {sorted(twice)}; needed but defined nowhere: {missing}"


_PLAN_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "spmm24.h"
int main(int argc, char** argv) {
  int a[8];
  for (int i = 0; i < 8; ++i) a[i] = std::atoi(argv[i + 1]);
  const auto p = sdsengine::spmm24_plan(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
  std::printf("%d %d %d %d %d %d %d %d %d\n", p.n_tiles, p.token_blocks, p.groups, p.m_blocks, p.splits,
              p.kb_per_split, p.kb_per_chunk, p.x_buffers, p.smem_bytes);
}
"""


@pytest.fixture(scope="module")
def decode_plan(compilers, tmp_path_factory):
    """The decode kernel's launch plan (spmm24_plan, host code) run here: the sm_80 object linked into a small
    program. plan(M, N, K, sms, split_k, groups, typical_rows, x_buffers) -> the plan's fields."""
    proc = compilers["spmm24_sm80.cu-sm_80"]
    _finish(proc)
    out = tmp_path_factory.mktemp("plan")
    (out / "main.cpp").write_text(_PLAN_MAIN)
    link = subprocess.run([NVCC, "-std=c++17", f"-I{CSRC}", str(out / "main.cpp"), proc.args[proc.args.index("-o") + 1],
                           "-o", str(out / "plan")], capture_output=True, text=True)
    assert link.returncode == 0, link.stdout + link.stderr

    def plan(m, n, k, sms=132, split_k=0, groups=1, typical_rows=0, x_buffers=1):
        args = (m, n, k, sms, split_k, groups, typical_rows, x_buffers)
        line = subprocess.run([str(out / "plan"), *map(str, args)], capture_output=True, text=True, check=True).stdout
        fields = ("n_tiles", "token_blocks", "groups", "m_blocks", "splits", "kb_per_split", "kb_per_chunk",
                  "x_buffers", "smem_bytes")
        return dict(zip(fields, map(int, line.split())))
    return plan


def test_the_decode_plan_sizes_its_token_tile_for_the_rows(decode_plan):
    tiles = {n: decode_plan(4096, n, 4096) for n in (1, 8, 9, 16, 17, 33, 64, 100)}
    assert {n: p["n_tiles"] for n, p in tiles.items()} == {1: 1, 8: 1, 9: 2, 16: 2, 17: 4, 33: 8, 64: 8, 100: 8}
    assert tiles[100]["token_blocks"] == 2 and tiles[64]["token_blocks"] == 1
    assert decode_plan(4096, 1, 4096)["splits"] > decode_plan(4096, 64, 4096, groups=16)["splits"] >= 1


def test_the_decode_plan_fills_one_wave_at_most(decode_plan):
    """At one token the plan splits K into as many slices as one wave of resident blocks holds (3 per SM with
    the three-block ring), never a partial second wave: at 132 SMs, 396 slots."""
    plans = {shape: decode_plan(*shape, 132) for shape in
             [(4096, 1, 4096), (11008, 1, 4096), (14336, 1, 4096), (4096, 1, 11008), (1024, 1, 4096)]}
    blocks = {shape: p["m_blocks"] * p["splits"] for shape, p in plans.items()}
    assert all(b <= 3 * 132 for b in blocks.values()), blocks
    assert {shape[:3:2]: p["splits"] for shape, p in plans.items()} == {
        (4096, 4096): 6, (11008, 4096): 2, (14336, 4096): 1, (4096, 11008): 6, (1024, 4096): 16}


def test_two_x_buffers_halve_the_chunk_within_the_same_shared_memory(decode_plan):
    """x_buffers=2 (the experiment): two buffers of half the chunk, within the 48 KiB a block gets without
    opting in; one buffer where a slice is one chunk of the halved size anyway, and at 33-64 tokens, where one
    256-wide block of X (64 rows, 33 KiB) is more than half."""
    chunks = {}
    for tokens in (1, 16, 32, 64):
        one, two = (decode_plan(14336, tokens, 4096, split_k=1, x_buffers=b) for b in (1, 2))
        assert one["x_buffers"] == 1 and max(one["smem_bytes"], two["smem_bytes"]) <= 48 * 1024, (one, two)
        assert (one["splits"], one["kb_per_split"]) == (two["splits"], two["kb_per_split"]) == (1, 16)
        chunks[tokens] = (one["kb_per_chunk"], two["kb_per_chunk"], two["x_buffers"])
    assert chunks == {1: (11, 5, 2), 16: (5, 2, 2), 32: (2, 1, 2), 64: (1, 1, 1)}
    short = decode_plan(14336, 16, 512, split_k=1, x_buffers=2)  # 2 blocks: one chunk of the halved size
    assert (short["x_buffers"], short["kb_per_chunk"]) == (1, 2)


def test_a_grouped_plan_tiles_for_the_typical_rows_and_counts_only_blocks_with_rows(decode_plan):
    """64 decode tokens of Qwen3-30B-A3B (gate_up 1536 x 2048, 128 experts, 8 per token): ~4 rows per expert."""
    plan = decode_plan(1536, 64, 2048, groups=128, typical_rows=4)
    assert (plan["n_tiles"], plan["token_blocks"], plan["groups"]) == (1, 8, 128)  # blocks still cover 64 rows
    assert decode_plan(1536, 64, 2048, groups=128)["n_tiles"] == 8  # without the hint: tiles for all 64
    # blocks past a group's typical rows leave at once, so they do not count toward filling the GPU: the split-K
    # is that of a call whose groups have the typical rows only
    few = decode_plan(64, 64, 65536, groups=2, typical_rows=8)
    assert few["token_blocks"] == 8 and few["splits"] == decode_plan(64, 8, 65536, groups=2)["splits"] == 128
