"""Build script: the Python package, the Triton kernels (shipped as
``distillkit.kernels`` from the top-level ``kernels/`` folder) and, where a
compiler is present, the C++/CUDA extension ``distillkit._C`` from ``csrc/``.

Environment:
  DISTILLKIT_SKIP_EXT=1     build no extension (pure Python install)
  DISTILLKIT_FORCE_CUDA=1   build the CUDA kernels even without a CUDA-enabled torch or
                            a visible nvcc (fails loudly if they cannot be compiled)
  DISTILLKIT_NO_CUDA=1      build the C++ CPU kernels only
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0+PTX")
  MAX_JOBS                  parallel compile jobs (default: bounded by cores and memory)
  DISTILLKIT_NVCC_THREADS   nvcc --threads for the CUDA targets (default 2)

Install without build isolation so the extension builds against the installed torch:
  pip install --no-build-isolation -e .
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

# Every distillkit.* subpackage, plus the top-level kernels/ folder shipped as distillkit.kernels.
PACKAGES = find_packages(include=["distillkit", "distillkit.*"]) + ["distillkit.kernels"]
PACKAGE_DIR = {"distillkit": "distillkit", "distillkit.kernels": "kernels"}
HERE = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = 0x030A0000  # the module has no Python bindings: one abi3 build per platform


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _note(msg: str) -> None:
    print(f"[distillkit setup] {msg}", file=sys.stderr)


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH, /usr/local/cuda, or the toolkit of the nvcc on PATH (resolving
    wrapper scripts and symlinks poorly guessed by torch) -- the first with bin/nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return str(max(1, min(cores, int(mem_gb // 3))))  # nvcc on the torch headers peaks near 2-3 GB


def extensions():
    """(ext_modules, cmdclass) for distillkit._C, or ([], {}) when nothing can or should be built."""
    if _flag("DISTILLKIT_SKIP_EXT"):
        _note("DISTILLKIT_SKIP_EXT=1: building no extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _note(f"no C++ compiler ({cxx}) found: building no extension")
        return [], {}
    try:
        import torch
    except ImportError:
        _note("torch is not importable (install with --no-build-isolation): building no extension")
        return [], {}

    force_cuda = _flag("DISTILLKIT_FORCE_CUDA")
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    from torch.utils import cpp_extension

    with_cuda = not _flag("DISTILLKIT_NO_CUDA") and (
        force_cuda or (torch.version.cuda is not None and cuda_home is not None))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    os.environ.setdefault("MAX_JOBS", _max_jobs())

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "distill_cpu.cpp")]
    # -fopenmp: at::parallel_for is inline and runs serially without it; the extension shares
    # torch's libgomp (same soname, already loaded). -fno-trapping-math lets GCC if-convert the
    # masked float selects into vector blends (no FP exceptions are ever unmasked).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    extra = {"cxx": cxx_flags}
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources.append(os.path.join(csrc, "distill_cuda.cu"))
        # --threads: nvcc compiles the gencode targets (sm_80, sm_90, compute_90 PTX) in parallel;
        # the .cu file is the long pole of the build.
        threads = os.environ.get("DISTILLKIT_NVCC_THREADS", "2")
        extra["nvcc"] = ["-O3", "-std=c++20", f"--threads={threads}", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
        kind = cpp_extension.CUDAExtension
        _note(f"building the CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        _note(f"building the CPU kernels only (MAX_JOBS={os.environ['MAX_JOBS']})")
    ext = kind("distillkit._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
               py_limited_api=True)
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


EXT_MODULES, CMDCLASS = extensions()
OPTIONS = {"bdist_wheel": {"py_limited_api": "cp310"}} if EXT_MODULES else {}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS, options=OPTIONS)
