"""Build script: package metadata lives in pyproject.toml; this file adds the compiled core.

    pip install --no-build-isolation -e .        (uses the installed torch; needs a C++ compiler)

builds ``kdplug._C`` with ``torch.utils.cpp_extension`` (ninja): the operator schemas and the
pybind11 module (``csrc/kdplug.cpp``), the CPU kernels (``csrc/cpu/*.cpp``) and, when torch has
CUDA and a toolkit is found, the CUDA kernels (``csrc/cuda/*.cu``). Environment switches:

    KDPLUG_SKIP_EXT=1      pure-Python install; kdplug then runs its PyTorch path
    KDPLUG_NO_CUDA=1       never build the CUDA kernels
    KDPLUG_FORCE_CUDA=1    build them even without a visible GPU (torch with CUDA + a toolkit needed;
                           TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0+PTX then)
    KDPLUG_CPU_ISA=...     SIMD level of the CPU kernels: auto (default), avx512, avx2, none
    DEBUG=1                -O0 -g
    MAX_JOBS=N             parallel compile jobs
    TORCH_CUDA_ARCH_LIST   CUDA architectures (default: torch's choice for the visible GPUs); when
                           set, the CUDA kernels are built without a visible GPU too

CPU SIMD level. The kernels use at::vec, which selects its AVX2 / AVX-512 implementation at
compile time. ``auto`` compiles for what torch detects on the building machine (the common case:
pip builds on the machine that runs it). The level is recorded in ``kdplug/_build_config.py``,
and ``kdplug._extension`` refuses to load the extension on a CPU without it (falling back to the
PyTorch path with the reason) instead of crashing with an illegal instruction. Build wheels meant
for other machines with ``KDPLUG_CPU_ISA=avx2`` (or ``none``).
"""
import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    # the flags PyTorch compiles its own kernels of the same level with
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c", "-mbmi",
               "-mbmi2", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "none": [],
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cpu_isa(torch) -> str:
    isa = os.environ.get("KDPLUG_CPU_ISA", "auto").strip().lower()
    if isa not in ("auto", *ISA_FLAGS):
        sys.exit(f"setup.py: KDPLUG_CPU_ISA must be one of auto, {', '.join(ISA_FLAGS)}; got {isa!r}")
    if isa != "auto":
        return isa
    if sys.platform == "win32" or os.uname().machine not in ("x86_64", "AMD64"):
        return "none"  # (aarch64: at::vec's NEON path needs no flags)
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "none")


def _write_build_config(isa: str, cuda: bool) -> None:
    text = ('"""Written by setup.py: how kdplug._C was built (read before loading it)."""\n'
            f"CPU_ISA = {isa!r}\nWITH_CUDA = {cuda!r}\n")
    path = os.path.join(ROOT, "kdplug", "_build_config.py")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def extensions():
    if _flag("KDPLUG_SKIP_EXT"):
        print("kdplug: KDPLUG_SKIP_EXT=1, building no extension (PyTorch path only)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    isa = _cpu_isa(torch)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_bindings = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    gpu = torch.version.cuda is not None and torch.cuda.is_available()
    # (without a visible GPU, torch needs TORCH_CUDA_ARCH_LIST to pick the architectures)
    want_cuda = not _flag("KDPLUG_NO_CUDA") and (_flag("KDPLUG_FORCE_CUDA") or gpu or
                                                 (torch.version.cuda is not None and bool(archs)))
    with_cuda = bool(want_cuda and torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources)
    # The configuration, first (as torchvision does): what this build will and will not contain.
    print(f"kdplug: torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}, "
          f"CPU ISA={isa}, CUDA kernels={'yes' if with_cuda else 'no'} ({len(cuda_sources)} .cu files), "
          f"DEBUG={int(debug)}, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
    if want_cuda and not with_cuda:
        print("kdplug: CUDA kernels not built: " + (
            "torch has no CUDA" if torch.version.cuda is None else
            "no CUDA toolkit found (CUDA_HOME)" if CUDA_HOME is None else "no csrc/cuda/*.cu sources yet"))
    _write_build_config(isa, with_cuda)

    sources = (["csrc/kdplug.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-fast-math: the kernels rely on IEEE infinities and NaN (the zero-probability rules).
    # -ffp-contract=off: a * b + c is fused into an fma only where the code says so (the inline
    # exp / log polynomials), not wherever the inliner happens to make it possible, so that the
    # same formula gives the same bits in every kernel (divergence_fwd_grad vs divergence_bwd).
    # (-Wno-maybe-uninitialized: GCC 12 false positives inside its own AVX-512 intrinsics headers)
    cxx += ["-fopenmp", "-fno-fast-math", "-ffp-contract=off", "-fvisibility=hidden",
            "-Wno-maybe-uninitialized"] + ISA_FLAGS[isa]
    define_macros = []
    extension = CppExtension
    kwargs = {}
    if with_cuda:
        extension = CUDAExtension
        sources += cuda_sources + cuda_bindings
        if not archs and not gpu:  # forced without a GPU: sm_80 and sm_90 (+ PTX for newer GPUs)
            archs = os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        if not archs:  # torch's default, the visible GPUs' architectures (for build_info)
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
        # bare tokens (csrc/kdplug.cpp stringifies them): ninja runs the compilers through a shell,
        # which would strip quotes around a string literal
        define_macros += [("KDPLUG_WITH_CUDA", None), ("KDPLUG_CUDA_VERSION", torch.version.cuda),
                          ("KDPLUG_CUDA_ARCHS", re.sub(r"[^0-9A-Za-z.+]+", "_", archs).strip("_"))]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": (["-O0", "-g", "-G"] if debug else ["-O3"])
                                        + ["--expt-relaxed-constexpr", "-lineinfo"]}
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
    ext = extension("kdplug._C", sources, define_macros=define_macros, extra_link_args=["-fopenmp"], **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
