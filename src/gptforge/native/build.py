"""Building and loading the native library: the C++ sources of csrc/ compiled on first use for this CPU.

The sources are compiled with g++ -O3 -march=native -fopenmp (in parallel, ~20 s on 2 cores) into a cache folder
keyed by the sources, the headers, the flags, the torch version and the CPU's flags, then loaded as torch ops
(`torch.ops.gptforge_gemv`, `gptforge_attn`, `gptforge_decode`). Without a compiler `available()` is False, with
one warning, and callers keep PyTorch's kernels: slower, same results.

GPTFORGE_NATIVE_KERNELS=0 skips the build (and its warning). It is read here and nowhere else: the library is
loaded once per process by whichever verb reaches a decode first (generate, serve, eval, a quantized model), so a
switch a user can set without a compiler, before any of them runs, is the one place to say "never build".
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from gptforge.native.schema import check_schema

CSRC = Path(__file__).parent / "csrc"
# The matmuls, the attention of a decode step over the KV cache, a whole block's decode step and a whole model's
# (step.cpp): one library.
# HEADERS are hashed with the sources into the library's name.
SOURCES = [CSRC / name for name in ("gemv.cpp", "qgemv.cpp", "attention.cpp", "block.cpp", "step.cpp")]
HEADERS = [CSRC / "kernels.h", CSRC / "qgemv_body.h", CSRC / "qgemv_avx256.h"]
# -fopenmp: at::parallel_for is a header template, so without it the kernels' loops over output rows ran on one
# thread whatever torch.set_num_threads said; libgomp.so.1 is torch's own, already loaded.
FLAGS = ["-O3", "-march=native", "-std=c++20", "-fopenmp", "-fPIC", "-w",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
ENV_SWITCH = "GPTFORGE_NATIVE_KERNELS"
_loaded: bool | None = None


def cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: the library is built with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where the library built from these sources, flags, torch and CPU lives in the cache folder."""
    parts = [*(p.read_bytes() for p in SOURCES + HEADERS), *map(str.encode, FLAGS), torch.__version__.encode(),
             cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge" / "kernels"
    return root / f"gemv-{key.hexdigest()[:16]}.so"


def build(dest: Path) -> None:
    """Compile csrc/*.cpp into dest, the sources in parallel: written under a temporary name, then renamed (two
    processes building at once each rename a complete file)."""
    # Imported here, not at the top: it pulls in setuptools and packaging (~4 MB resident) that only a build needs.
    from torch.utils import cpp_extension

    dest.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        compiles = [subprocess.Popen([cxx, *FLAGS, *includes, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE,
                                     text=True) for src, obj in zip(SOURCES, objects)]
        for c, stderr in [(c, c.communicate()[1]) for c in compiles]:  # every compiler finishes before a raise
            _check(c.returncode, stderr)
        so = Path(tmp) / dest.name
        link = subprocess.run([cxx, *FLAGS, "-shared", *map(str, objects), "-o", str(so),
                               *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"],
                              capture_output=True, text=True)
        _check(link.returncode, link.stderr)
        os.replace(so, dest)


def _check(returncode: int, stderr: str) -> None:
    """Raise with the compiler's first error line (the one that names the cause)."""
    if returncode:
        errors = [line for line in stderr.splitlines() if "error" in line] or stderr.strip().splitlines()
        raise RuntimeError(errors[0] if errors else f"exit {returncode}")


def available() -> bool:
    """Whether the library is loaded (building it on the first call); False on failure, with one warning."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
            return False
        try:
            path = library_path()
            if not path.exists():
                build(path)
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError, FileNotFoundError) as e:
            warnings.warn(f"gptforge: the CPU decode kernels (native/csrc) could not be built ({e}); decoding uses "
                          f"PyTorch's kernels, which are slower. Install g++ to enable them, or set "
                          f"{ENV_SWITCH}=0 to silence this.", stacklevel=2)
            return False
        check_schema()  # a library whose block op reads its parameters in another order must not run
        _loaded = True
    return _loaded
