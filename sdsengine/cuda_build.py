"""The nvcc flags of the sdsengine._C extension, shared by setup.py (which reads this file without importing
the package) and the JIT build in sdsengine.ops. Dependency-free on purpose.

mma.sp (spmm24_sm80.cu) runs on every GPU from Ampere on: sm_80 code serves 8.x. Hopper gets sm_90a code,
which holds both kernels (spmm24_sm90.cu's wgmma.sp exists only there) and runs only on compute capability
9.0; compute_90 PTX serves later GPUs with the mma.sp kernel alone. Naming the targets also keeps torch from
adding its own (a plain sm_90 image beside sm_90a would leave the choice between them to the driver).
"""
GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
)
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", *GENCODE)
