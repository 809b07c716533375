"""Builds the optional CUDA dispatch extension (smile.moe._C) only where CUDA can build it.

A plain CPU install (no nvcc, or a CPU build of torch) skips the extension silently; smile then
uses its Triton or pure-torch dispatch backends.
"""

import glob
import os

from setuptools import find_packages, setup


def _cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("SMILE_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        "smile.moe._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
# models/ is installed as smile.models (the zoo), mapped in pyproject's package-dir.
packages = (
    find_packages(include=["smile", "smile.*"])
    + ["smile.models." + p for p in find_packages("models")]
    + ["smile.models"]
)
setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
