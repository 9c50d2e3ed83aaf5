"""Installs sdsengine (with kernels/ as sdsengine.kernels) and, where CUDA can build it, the 2:4 extension."""
from setuptools import setup

setup(
    name="sdsengine",
    version="0.1.0",
    description="One-shot pruning of language models to 2:4 and other sparsity, with fast sparse kernels",
    packages=["sdsengine", "sdsengine.algorithms", "sdsengine.pipeline", "sdsengine.eval", "sdsengine.nn",
              "sdsengine.kernels"],
    package_dir={"sdsengine.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.45", "safetensors", "tqdm", "numpy"],
    extras_require={
        "gguf": ["gguf", "accelerate"],
        "hub": ["datasets"],
        "triton": ["triton"],
        "dev": ["pytest", "gguf", "accelerate", "triton", "ninja"],
    },
    entry_points={"console_scripts": ["sdsengine=sdsengine.cli:main"]},
)
