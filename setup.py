"""Build and install fastem (the ``fastem_ext`` package and the ``fastem`` command).

The fused ops are compiled into ``fastem_ext._C``: a ``CppExtension`` (CPU kernels) on CPU-only
torch, a ``CUDAExtension`` (CPU and CUDA kernels) where torch has CUDA and a CUDA toolkit exists.
Build switches (environment variables):

- ``FASTEM_NO_EXT=1``: no extension; the package runs on its pure-torch references.
- ``FASTEM_NO_CUDA=1``: CPU kernels only, even where CUDA could be built.
- ``FASTEM_FORCE_CUDA=1``: fail unless the CUDA kernels can be built.

Building the extension needs torch at build time: ``pip install --no-build-isolation -e .``; a
plain ``pip install -e .`` (isolated build, no torch) installs the package without it.
"""

import os
from glob import glob

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_choice() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("FASTEM_NO_CUDA"):
        return False, "FASTEM_NO_CUDA is set"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None:
        reason = f"torch has CUDA {torch.version.cuda} but no CUDA toolkit was found (CUDA_HOME)"
    else:
        return True, f"torch has CUDA {torch.version.cuda} and the toolkit is at {CUDA_HOME}"
    if _flag("FASTEM_FORCE_CUDA"):
        raise RuntimeError(f"FASTEM_FORCE_CUDA is set but {reason}")
    return False, reason


def _extensions() -> tuple[list, dict]:
    if _flag("FASTEM_NO_EXT"):
        print("fastem: FASTEM_NO_EXT is set: no fastem_ext._C, the ops run their references")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # pip's isolated build environment has no torch (and must not fetch one: that would be
        # a multi-GB CUDA build). The package still works, on the pure-torch references.
        print("fastem: torch is not importable at build time: no fastem_ext._C (the ops run "
              "their references); build it with `pip install --no-build-isolation -e .`")
        return [], {}

    sources = sorted(glob("csrc/*.cpp") + glob("csrc/cpu/*.cpp"))
    # No FP trap handlers are ever enabled: without this GCC keeps the clamps of the elementwise
    # kernels as branches (it may not speculate a comparison that could trap) and does not
    # vectorise them (30x on ddpm_update's clamp, 256² × 3); results are unchanged.
    cxx = ["-O3", "-fno-trapping-math"]
    use_cuda, reason = _cuda_choice()
    if use_cuda:
        print(f"fastem: building fastem_ext._C as a CUDAExtension (CPU + CUDA): {reason}")
        sources += sorted(glob("csrc/cuda/*.cu"))
        macros = [("FASTEM_WITH_CUDA", None)]
        ext = CUDAExtension("fastem_ext._C", sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]})
    else:
        print(f"fastem: building fastem_ext._C as a CppExtension (CPU only): {reason}")
        ext = CppExtension("fastem_ext._C", sources, extra_compile_args={"cxx": cxx})
    # The library registers its ops with the dispatcher when loaded; it is not a Python module.
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastem",
    version="0.1.0",
    description="Blind image deblurring with a diffusion prior (Fast Diffusion EM)",
    packages=find_packages(include=["fastem_ext", "fastem_ext.*"]),
    package_data={"fastem_ext": ["weights/*.safetensors", "weights/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["fastem = fastem_ext.launch:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
