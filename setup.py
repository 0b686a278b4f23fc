"""Build of the native sparse-kernel library (graphprune/kernels/native) next to the pure-Python package.

The library is a plain shared object onnxruntime loads (RegisterCustomOps); it links nothing from
onnxruntime but needs its C API header at build time. The onnxruntime wheel ships none, so the header comes
from, in order: the folder named by GRAPHPRUNE_ORT_INCLUDE; a previous download cached under
~/.cache/graphprune/ort-headers; and only when GRAPHPRUNE_FETCH_HEADERS=1 is set, a download of the npm
package com.github.asus4.onnxruntime with `npm pack` (its Headers/*.h only, MIT, never committed). Nothing
is downloaded without that switch. Without a header the package installs anyway and the sparse ops run
through their dense function bodies; the build says which of these happened.

GRAPHPRUNE_SANITIZE=1 builds, instead of the library, a separate AddressSanitizer + UBSan build of it
(graphprune/kernels/_gp_kernels_sanitized*.so, never loaded by default; tests/test_kernels_sanitize.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"  # headers of onnxruntime 1.29 (C API version 29)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphprune" / "ort-headers" / "0.4.9"
HEADER = "onnxruntime_c_api.h"
FETCH_ENV = "GRAPHPRUNE_FETCH_HEADERS"
SANITIZE = os.environ.get("GRAPHPRUNE_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


def _say(msg: str) -> None:
    print(f"graphprune build: {msg}", file=sys.stderr)


def _from_npm(dest: Path) -> bool:
    npm = shutil.which("npm")
    if npm is None:
        _say("npm not found; cannot fetch onnxruntime's C headers")
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, timeout=600,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except (subprocess.SubprocessError, OSError) as exc:
            _say(f"npm pack {NPM_PACKAGE} failed: {exc}")
            return False
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            return False
        with tarfile.open(tgz) as tar:
            # one framework's Headers/ folder holds the whole C API (the other platforms repeat it)
            members = [m for m in tar.getmembers() if m.isfile() and "/Headers/" in m.name
                       and m.name.endswith(".h") and "ios-arm64_x86_64-simulator" in m.name]
            if not any(m.name.endswith("/" + HEADER) for m in members):
                members = [m for m in tar.getmembers() if m.isfile() and "/Headers/" in m.name and m.name.endswith(".h")]
            staging = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for m in members:
                src = tar.extractfile(m)
                if src is not None:
                    (staging / Path(m.name).name).write_bytes(src.read())
        if not (staging / HEADER).exists():
            shutil.rmtree(staging, ignore_errors=True)
            return False
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return True


def ort_include() -> Path | None:
    """The folder holding onnxruntime_c_api.h, saying where it came from; None when there is none."""
    named = os.environ.get("GRAPHPRUNE_ORT_INCLUDE")
    if named:
        path = Path(named)
        if (path / HEADER).exists():
            _say(f"onnxruntime C headers from GRAPHPRUNE_ORT_INCLUDE={path}")
            return path
        _say(f"GRAPHPRUNE_ORT_INCLUDE={named} has no {HEADER}; trying the cache")
    if (CACHE / HEADER).exists():
        _say(f"onnxruntime C headers from the cache {CACHE} (nothing downloaded)")
        return CACHE
    if os.environ.get(FETCH_ENV, "") in ("", "0"):
        _say(f"no onnxruntime C headers (GRAPHPRUNE_ORT_INCLUDE unset, cache {CACHE} empty) and {FETCH_ENV} "
             f"is not set, so nothing is downloaded")
        return None
    _say(f"{FETCH_ENV}=1: downloading onnxruntime C headers with `npm pack {NPM_PACKAGE}` into {CACHE}")
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _say(f"cannot create the header cache: {exc}")
        return None
    if _from_npm(CACHE):
        _say(f"downloaded the onnxruntime C headers to {CACHE}")
        return CACHE
    return None


class OptionalNativeBuild(build_ext):
    """Builds the kernel library when headers can be had; otherwise installs without it, saying so once."""

    def run(self):
        include = ort_include()
        if include is None:
            msg = ("onnxruntime C headers unavailable: the native sparse kernels are NOT built. graphprune "
                   "works; ai.graphprune sparse ops run through their dense function bodies. To build them, "
                   f"reinstall with {FETCH_ENV}=1 (downloads the headers from npm) or with GRAPHPRUNE_ORT_INCLUDE "
                   "set to an onnxruntime include/ folder.")
            if SANITIZE:
                raise RuntimeError(msg)
            _say("WARNING: " + msg)
            return
        for ext in self.extensions:
            ext.include_dirs.append(str(include))
        if SANITIZE:  # a sanitizer build is asked for explicitly: its failure is an error
            super().run()
            _say("built the AddressSanitizer + UBSan kernel library (load it with libasan preloaded)")
            return
        try:
            super().run()
            _say("built the native sparse kernels")
        except Exception as exc:  # noqa: BLE001 - a failed optional build must not fail the install
            _say(f"WARNING: building the native sparse kernels failed ({exc}); function-body fallback only")

    def get_export_symbols(self, ext):
        return ["RegisterCustomOps", "GraphpruneKernelsIsa"]


if SANITIZE:
    native = Extension(
        "graphprune.kernels._gp_kernels_sanitized",
        sources=["graphprune/kernels/native/gp_kernels.cc"],
        depends=["graphprune/kernels/native/kernels_impl.inc"],
        language="c++",
        # -O0: 2.8 s of compile CPU against 13.5 s at -O1; the sanitized tests still run in ~20 s
        extra_compile_args=["-O0", "-g", "-std=c++17", "-fvisibility=hidden"] + SANITIZE_FLAGS,
        extra_link_args=SANITIZE_FLAGS,
    )
else:
    native = Extension(
        "graphprune.kernels._gp_kernels",
        sources=["graphprune/kernels/native/gp_kernels.cc"],
        depends=["graphprune/kernels/native/kernels_impl.inc"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"] if os.name != "nt" else ["/O2"],
    )

setup(ext_modules=[native], cmdclass={"build_ext": OptionalNativeBuild})
