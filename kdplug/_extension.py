"""Loads the compiled core once; ``import kdplug`` never fails because it is missing."""
from __future__ import annotations

import functools
import warnings

import torch


_ISA_CPU_FLAGS = {  # what the CPU must have for each KDPLUG_CPU_ISA the extension may be built with
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "bmi2"),
    "avx2": ("avx2", "fma", "f16c", "bmi2"),
}


def _isa_problem() -> str | None:
    """Why this CPU cannot run the SIMD level kdplug._C was compiled for (setup.py records it)."""
    try:
        from . import _build_config
    except ImportError:
        return None
    needed = _ISA_CPU_FLAGS.get(getattr(_build_config, "CPU_ISA", "none"), ())
    if not needed:
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:  # not Linux: ask torch what it detected
        capability = torch.backends.cpu.get_cpu_capability()
        ok = capability == "AVX512" or (capability == "AVX2" and _build_config.CPU_ISA == "avx2")
        missing = () if ok else needed
    else:
        missing = tuple(flag for flag in needed if flag not in flags)
    if missing:
        return (f"kdplug._C was compiled for {_build_config.CPU_ISA.upper()} but this CPU lacks "
                f"{', '.join(missing)}; rebuild it on this machine (pip install --no-build-isolation -e .) "
                "or with KDPLUG_CPU_ISA=avx2 or none")
    return None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    problem = _isa_problem()  # checked first: loading it anyway would die of an illegal instruction
    if problem is not None:
        return None, problem
    try:
        from . import _C  # noqa: F401  (registers torch.ops.kdplug.* as a side effect)
    except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return None, f"the compiled extension kdplug._C could not be loaded ({exc!r})"
    if not hasattr(torch.ops.kdplug, "divergence_fwd"):
        return None, "kdplug._C loaded but registered no kdplug::divergence_fwd op"
    return _C, None


def has_ops() -> bool:
    """Whether ``torch.ops.kdplug.divergence_fwd``/``_bwd`` exist in this process."""
    return _load()[0] is not None


def why_not() -> str | None:
    """Why the compiled ops are unavailable (None when they are available)."""
    return _load()[1]


def build_info() -> dict:
    """What the extension was built with (empty when it is not available)."""
    module = _load()[0]
    if module is None:
        return {}
    return dict(module.build_info())


@functools.lru_cache(maxsize=None)
def warn_fallback(reason: str) -> None:
    """Warn once per distinct reason that ``backend="auto"`` fell back to PyTorch."""
    warnings.warn(f"kdplug: using the PyTorch path because {reason}. Pass backend='torch' to "
                  "silence this, or backend='compiled' to make it an error.", RuntimeWarning, stacklevel=4)


def assert_has_ops() -> None:
    """Raise with an actionable message when the compiled ops are unavailable."""
    reason = why_not()
    if reason is not None:
        raise RuntimeError(f"kdplug: backend='compiled' was requested but {reason}. Reinstall with "
                           "`pip install --no-build-isolation -e .` (needs a C++ compiler and ninja), "
                           "or use backend='auto'/'torch'.")
