"""The nvcc flags of the sdsengine._C extension, shared by setup.py (which reads this file without importing
the package) and the JIT build in sdsengine.ops. Dependency-free on purpose.

mma.sp (spmm24_sm80.cu) runs on every GPU from Ampere on: sm_80 code serves 8.x. Hopper gets sm_90a code,
which holds both kernels (spmm24_sm90.cu's wgmma.sp exists only there) and runs only on compute capability
9.0; compute_90 PTX serves later GPUs with the mma.sp kernel alone. Naming the targets also keeps torch from
adding its own (a plain sm_90 image beside sm_90a would leave the choice between them to the driver).
"""
import glob
import os
import re
import subprocess

GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
)
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--threads=0", *GENCODE)  # the three targets compiled at once

# The Hopper sources need CUDA 12 (wgmma.sp, CUtensorMap): an older toolkit cannot build the extension at
# all, and is named as the reason instead of failing the install.
MIN_TOOLKIT = (12, 0)


def toolkit_problem(cuda_home):
    """None if the toolkit under cuda_home can build the extension (a recent enough nvcc, and the CUDA headers
    where torch's build looks for them), else why not."""
    nvcc = f"{cuda_home}/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {nvcc}: {exc}"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"cannot read the CUDA version from `{nvcc} --version`"
    version = (int(found[1]), int(found[2]))
    if version < MIN_TOOLKIT:
        return f"CUDA toolkit {version[0]}.{version[1]} at {cuda_home} is older than {MIN_TOOLKIT[0]}.{MIN_TOOLKIT[1]}"
    # CUDA_HOME found from an nvcc wrapper on PATH (/usr/local/bin/nvcc) can point at a directory without the
    # headers, and then every C++ source fails. Where the compilers look: CUDA_HOME/include and CUDA_INC_PATH
    # (torch adds them), conda's targets/<arch>/include, and what the user points gcc at (CPATH and co.).
    headers = [f"{cuda_home}/include", *glob.glob(f"{cuda_home}/targets/*/include"),
               *(d for var in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH")
                 for d in os.environ.get(var, "").split(os.pathsep) if d)]
    if not any(os.path.exists(os.path.join(d, "cuda_runtime.h")) for d in headers):
        return f"no cuda_runtime.h in {' or '.join(headers)}: set CUDA_HOME to the CUDA toolkit's root"
    return None
