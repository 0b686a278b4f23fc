"""Build of the native sparse-kernel library (graphprune/kernels/native) next to the pure-Python package.

The library is a plain shared object onnxruntime loads (RegisterCustomOps); it links nothing from
onnxruntime but needs its C API header at build time. The onnxruntime wheel ships none, so the header comes
from, in order: the folder named by GRAPHPRUNE_ORT_INCLUDE; a previous download cached under
~/.cache/graphprune/ort-headers; the npm package com.github.asus4.onnxruntime (its Headers/*.h only, MIT,
never committed). Without a header the package installs anyway and the sparse ops run through their dense
function bodies; the build says so once.
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
    named = os.environ.get("GRAPHPRUNE_ORT_INCLUDE")
    if named:
        path = Path(named)
        if (path / HEADER).exists():
            return path
        _say(f"GRAPHPRUNE_ORT_INCLUDE={named} has no {HEADER}; trying the cache and npm")
    if (CACHE / HEADER).exists():
        return CACHE
    if os.environ.get("GRAPHPRUNE_NO_DOWNLOAD"):
        return None
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return CACHE if _from_npm(CACHE) else None


class OptionalNativeBuild(build_ext):
    """Builds the kernel library when headers can be had; otherwise installs without it, saying so once."""

    def run(self):
        include = ort_include()
        if include is None:
            _say("WARNING: onnxruntime C headers unavailable: the native sparse kernels are NOT built. "
                 "graphprune works; ai.graphprune sparse ops run through their dense function bodies. "
                 "Set GRAPHPRUNE_ORT_INCLUDE to an onnxruntime include/ folder and reinstall to build them.")
            return
        for ext in self.extensions:
            ext.include_dirs.append(str(include))
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - a failed optional build must not fail the install
            _say(f"WARNING: building the native sparse kernels failed ({exc}); function-body fallback only")

    def get_export_symbols(self, ext):
        return ["RegisterCustomOps", "GraphpruneKernelsIsa"]


native = Extension(
    "graphprune.kernels._gp_kernels",
    sources=["graphprune/kernels/native/gp_kernels.cc"],
    depends=["graphprune/kernels/native/kernels_impl.inc"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"] if os.name != "nt" else ["/O2"],
)

setup(ext_modules=[native], cmdclass={"build_ext": OptionalNativeBuild})
