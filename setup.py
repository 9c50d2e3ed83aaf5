"""Installs sdsengine (with kernels/ as sdsengine.kernels) and, where CUDA can build it, the 2:4 extension.

The extension sdsengine._C is built only where it can and should be: torch with CUDA, a CUDA toolkit
(CUDA_HOME / nvcc), and either a visible GPU or SDSENGINE_BUILD_CUDA=1 (build machines without a GPU).
SDSENGINE_BUILD_CUDA=0 never builds it. pip's build isolation hides the installed torch, so build it with
`pip install --no-build-isolation -e .`; otherwise sdsengine.ops JIT-builds it on first use on a GPU.
"""
import glob
import os
import runpy
import warnings

from setuptools import setup

# Read, not imported: importing sdsengine here would need its dependencies at build time.
CUDA_BUILD = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdsengine", "cuda_build.py"))


def cuda_extension():
    """(ext_modules, cmdclass) for sdsengine._C, or ([], {}) with a warning saying why not."""
    wanted = os.environ.get("SDSENGINE_BUILD_CUDA")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("sdsengine: torch is not importable at build time (build isolation?); installing without "
                      "the CUDA extension (use `pip install --no-build-isolation`; sdsengine.ops can JIT-build it)")
        return [], {}
    missing = [why for why, hit in (("torch has no CUDA", torch.version.cuda is None),
                                     ("no CUDA toolkit (CUDA_HOME / nvcc)", CUDA_HOME is None),
                                     ("no GPU visible and SDSENGINE_BUILD_CUDA is not 1",
                                      wanted != "1" and not torch.cuda.is_available())) if hit]
    if not missing and (too_old := CUDA_BUILD["toolkit_problem"](CUDA_HOME)):
        missing.append(too_old)
    if missing:
        warnings.warn(f"sdsengine: installing without the CUDA extension: {'; '.join(missing)}")
        return [], {}
    extension = CUDAExtension(
        "sdsengine._C", sources=["csrc/bindings.cpp", *sorted(glob.glob("csrc/*.cu"))],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": list(CUDA_BUILD["NVCC_FLAGS"])})
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="sdsengine",
    version="0.1.0",
    description="One-shot pruning of language models to 2:4 and other sparsity, with fast sparse kernels",
    packages=["sdsengine", "sdsengine.algorithms", "sdsengine.pipeline", "sdsengine.eval", "sdsengine.nn",
              "sdsengine.kernels", "sdsengine.csrc"],
    # kernels/ installs only as sdsengine.kernels, never as a top-level `kernels` (Hugging Face ships a
    # package of that name that transformers probes for); tests/test_packaging.py checks the built wheel.
    # csrc/'s sources go along as sdsengine/csrc, for the JIT build where the wheel was built without CUDA.
    package_dir={"sdsengine.kernels": "kernels", "sdsengine.csrc": "csrc"},
    package_data={"sdsengine.csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.45", "safetensors", "tqdm", "numpy"],
    extras_require={
        "gguf": ["gguf", "accelerate"],
        "hub": ["datasets"],
        "triton": ["triton"],
        "dev": ["pytest", "gguf", "accelerate", "triton", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["sdsengine=sdsengine.cli:main"]},
)
