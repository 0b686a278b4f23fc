"""The native kernel tests (packing/numerics, hostile cases, concurrency) again, against an AddressSanitizer +
UBSan build of the library: any out-of-bounds access, use after free or undefined behaviour aborts a test
process and fails this test.

Opt-in (marker `sanitize`, deselected by default; .ci/run runs it): `python -m pytest -m sanitize`. It builds
the library with GRAPHPRUNE_SANITIZE=1 (setup.py) into a temporary folder, then runs pytest in a child
process with gcc's libasan preloaded (python itself is not instrumented) and GRAPHPRUNE_KERNEL_LIBRARY
pointing at the sanitized build.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sanitize
ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_kernels_hostile.py", "tests/test_kernels_concurrency.py"]


def _gcc_file(name: str) -> str:
    """Absolute path of a gcc runtime library (gcc prints the bare name when it has none)."""
    out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
    path = out.strip()
    assert os.path.isabs(path) and os.path.exists(path), f"gcc has no {name} (Debian: apt-get install libasan8)"
    return path


def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    began = time.perf_counter()
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "build")],
        cwd=ROOT, env={**os.environ, "GRAPHPRUNE_SANITIZE": "1"}, capture_output=True, text=True, check=False,
        timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    libs = list((tmp_path / "lib").rglob("_gp_kernels_sanitized*.so"))
    assert len(libs) == 1, build.stderr[-2000:]
    lib = str(libs[0])
    # instrumented: the library calls into the sanitizer runtimes
    symbols = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True,
                             check=True).stdout
    assert "__asan_report_load" in symbols and "__ubsan_handle" in symbols

    env = {
        **os.environ,
        # libstdc++ too: libasan's __cxa_throw interceptor needs it loaded first, or onnxruntime's first
        # C++ exception aborts the (uninstrumented, C) python process
        "LD_PRELOAD": f"{_gcc_file('libasan.so')} {_gcc_file('libstdc++.so')}",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "GRAPHPRUNE_KERNEL_LIBRARY": lib,
        "GRAPHPRUNE_TEST_RUNS_PER_THREAD": "60",
    }
    probe = subprocess.run(
        [sys.executable, "-c", ("import ctypes, graphprune.kernels as gk; ctypes.CDLL(gk.library_path()); "
                                "print(gk.library_path()); "
                                "print(sum('libasan' in l for l in open('/proc/self/maps')))")],
        env=env, capture_output=True, text=True, check=False, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    loaded, asan_maps = probe.stdout.split()
    assert loaded == lib and int(asan_maps) > 0  # the child loads this build, with the runtime live

    summaries = []
    # every kernel test on the AVX2 kernels this CPU picks, then the numerics on the portable build of
    # the same source (GRAPHPRUNE_NO_AVX2), which other CPUs run
    for tests, extra in ((KERNEL_TESTS, {}), (KERNEL_TESTS[:1], {"GRAPHPRUNE_NO_AVX2": "1"})):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, check=False, timeout=600)
        out = run.stdout + run.stderr
        assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
        assert run.returncode == 0, out[-6000:]
        summary = out.strip().splitlines()[-1]
        assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, summary
        summaries.append(summary)
    print(f"sanitized kernel tests: {summaries}; build + runs {time.perf_counter() - began:.1f} s")
