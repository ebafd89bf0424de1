"""Builds the CUDA extension `engine._C` where a CUDA build of torch and nvcc are present.

On a CPU-only machine (or under pip's build isolation, where torch is absent) the package installs
without it and engine/ops.py serves the PyTorch references. GPU install, offline included:
    pip install nvidia-cutlass==4.2.0.0        # CUTLASS headers (or set CUTLASS_DIR)
    pip install --no-build-isolation -e .
SMOOTHSERVE_BUILD_EXT=0 skips the extension; =1 makes a failure to find the toolchain an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def cutlass_include_dirs() -> list[str]:
    if os.environ.get("CUTLASS_DIR"):
        base = Path(os.environ["CUTLASS_DIR"])
        return [str(base / "include"), str(base / "tools" / "util" / "include")]
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise RuntimeError("CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0, or set CUTLASS_DIR")
    source = Path(spec.origin).parent / "source"
    return [str(source / "include"), str(source / "tools" / "util" / "include")]


def extension_build() -> tuple[list, dict]:
    choice = os.environ.get("SMOOTHSERVE_BUILD_EXT", "auto")
    if choice == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if choice == "1":
            raise
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if choice == "1":
            raise RuntimeError("SMOOTHSERVE_BUILD_EXT=1 but torch has no CUDA or nvcc was not found")
        return [], {}
    # Hopper kernels need the arch-specific sm_90a target; sm_80 serves A100/L40-class GPUs.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    sources.append("csrc/torch_bindings.cpp")
    nvcc_flags = ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "--use_fast_math"]
    extension = CUDAExtension(
        name="engine._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *cutlass_include_dirs()],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
