"""graphprune's native onnxruntime kernels for the ai.graphprune sparse ops (SPEC.md).

The shared library is built by the package's own build (setup.py) when onnxruntime's C headers can be had;
without it every model still runs, through the dense function bodies the ops carry (at dense speed).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_WARNED = False
DISABLE_ENV = "GRAPHPRUNE_DISABLE_NATIVE"
# Another build of the library to load instead of the package's own (the sanitizer test points it at the
# AddressSanitizer build, which only loads with libasan preloaded and so is never picked up by default).
LIBRARY_ENV = "GRAPHPRUNE_KERNEL_LIBRARY"


def _built() -> Path | None:
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override) if Path(override).is_file() else None
    # exactly _gp_kernels.<abi tag>.<suffix>: not _gp_kernels_sanitized*
    found = sorted(p for p in _HERE.glob("_gp_kernels.*") if p.suffix in (".so", ".pyd", ".dylib"))
    return found[0] if found else None


def library_path() -> str | None:
    """Path of the built kernel library (or of $GRAPHPRUNE_KERNEL_LIBRARY), or None (not built, or disabled
    by GRAPHPRUNE_DISABLE_NATIVE=1)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    path = _built()
    return str(path) if path else None


def available() -> bool:
    return library_path() is not None


def status() -> str:
    """One line: which library onnxruntime gets, or why there is none."""
    import onnxruntime as ort
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"native kernels disabled by {DISABLE_ENV}; function-body fallback (dense speed)"
    path = _built()
    if path is None:
        if os.environ.get(LIBRARY_ENV):
            return f"{LIBRARY_ENV}={os.environ[LIBRARY_ENV]} is not a file; function-body fallback (dense speed)"
        return ("native kernels not built (no onnxruntime C headers at install time: reinstall with "
                "GRAPHPRUNE_FETCH_HEADERS=1 to fetch them from npm, or set GRAPHPRUNE_ORT_INCLUDE); "
                "function-body fallback (dense speed)")
    return f"native kernels {path.name} ({isa()}), onnxruntime {ort.__version__}"


def isa() -> str:
    """'avx2' or 'portable': the code path the library picked for this CPU."""
    path = library_path()
    if path is None:
        return "none"
    import ctypes
    lib = ctypes.CDLL(path)
    lib.GraphpruneKernelsIsa.restype = ctypes.c_char_p
    return lib.GraphpruneKernelsIsa().decode()


def session_options(base=None):
    """onnxruntime SessionOptions with the kernel library registered (a copy of `base`'s settings is not
    made: `base` itself is returned, registered). Without the library: `base` (or new options) and one
    warning that the sparse ops run through their dense function bodies."""
    import onnxruntime as ort
    global _WARNED
    opts = base if base is not None else ort.SessionOptions()
    path = library_path()
    if path is None:
        if not _WARNED:
            warnings.warn(f"graphprune: {status()}", RuntimeWarning, stacklevel=2)
            _WARNED = True
        return opts
    opts.register_custom_ops_library(path)
    return opts


__all__ = ["library_path", "available", "status", "session_options", "isa"]
