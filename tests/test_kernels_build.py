"""setup.py's header policy: nothing is downloaded unless GRAPHPRUNE_FETCH_HEADERS=1, and the build says what
happened. Runs setup.py with an empty header cache and a stand-in `npm` on PATH that only records its calls,
so no network is touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_without_headers(tmp_path: Path, fetch: bool) -> tuple[subprocess.CompletedProcess, str]:
    calls = tmp_path / "npm-calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    npm.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRAPHPRUNE_ORT_INCLUDE", "GRAPHPRUNE_FETCH_HEADERS", "GRAPHPRUNE_SANITIZE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", XDG_CACHE_HOME=str(tmp_path / "cache"))
    if fetch:
        env["GRAPHPRUNE_FETCH_HEADERS"] = "1"
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "build")],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    return proc, calls.read_text() if calls.exists() else ""


def test_build_downloads_nothing_by_default_and_says_so(tmp_path):
    proc, npm_calls = build_without_headers(tmp_path, fetch=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert npm_calls == ""
    assert "GRAPHPRUNE_FETCH_HEADERS is not set, so nothing is downloaded" in proc.stderr
    assert "native sparse kernels are NOT built" in proc.stderr
    assert not list((tmp_path / "lib").rglob("_gp_kernels*"))


def test_fetch_switch_runs_npm_pack_and_a_failed_download_still_installs(tmp_path):
    proc, npm_calls = build_without_headers(tmp_path, fetch=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert npm_calls.startswith("pack com.github.asus4.onnxruntime@"), npm_calls
    assert "GRAPHPRUNE_FETCH_HEADERS=1: downloading onnxruntime C headers with `npm pack" in proc.stderr
    assert "npm pack com.github.asus4.onnxruntime" in proc.stderr and "failed" in proc.stderr
    assert "native sparse kernels are NOT built" in proc.stderr
