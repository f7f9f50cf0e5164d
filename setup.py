"""Installs the pure-Python package everywhere; builds medusa_kernels._C from csrc/ only where
CUDA and a CUDA build of torch are visible at build time (use `pip install --no-build-isolation`),
otherwise prints one line and goes on. Honours MAX_JOBS (ninja) and MEDUSA_KERNELS_NO_EXT=1."""

import glob
import os

from setuptools import find_packages, setup


def cuda_extension():
    if os.environ.get("MEDUSA_KERNELS_NO_EXT") == "1":
        print("medusa_kernels: MEDUSA_KERNELS_NO_EXT=1, not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("medusa_kernels: torch not importable at build time, CUDA extension skipped")
        return [], {}
    if not sources or torch.version.cuda is None or CUDA_HOME is None:
        print("medusa_kernels: no CUDA torch/nvcc (or no csrc sources), CUDA extension skipped")
        return [], {}
    ext = CUDAExtension(
        "medusa_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="medusa_kernels",
    version="0.1.0",
    description="Fused GPU kernels and a thin PyTorch decoder for Medusa speculative decoding",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["medusa_kernels", "medusa_kernels.*"]),
    package_data={"medusa_kernels": ["assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        "jinja2>=3.1.6",
    ],
    extras_require={
        "test": ["pytest", "transformers", "accelerate", "hypothesis", "ruff"],
        "bench": ["matplotlib", "rich"],
        "gguf": ["gguf>=0.10"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
