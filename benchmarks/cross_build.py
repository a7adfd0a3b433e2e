"""Compile the engine's native kernels for another CPU architecture: a build check, not a run.

The NEON variant (AArch64) cannot be built or timed on an x86 machine with the system
compiler. This script compiles every source of ``ftwt/engine/csrc`` for a target triple with
the clang that the ``ziglang`` wheel bundles (``pip install ziglang``: not a dependency of
ftwt), against this PyTorch's headers, and reports per source whether it compiled. It proves
the target's branch of ``csrc/simd.h`` (vector types, register tiles) compiles; it says
nothing about speed or results on that CPU.

    pip install ziglang
    python benchmarks/cross_build.py                       # aarch64-linux-gnu: the NEON variant
    python benchmarks/cross_build.py --target x86_64-linux-gnu --march x86_64_v4
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import include_paths

from ftwt.engine._native import SOURCES


def _omp_header_dir() -> str | None:
    """A folder holding the host GCC's ``omp.h`` (PyTorch's headers include it; zig ships none)."""
    found = sorted(glob.glob("/usr/lib/gcc/*/*/include/omp.h"))
    return str(Path(found[-1]).parent) if found else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="aarch64-linux-gnu", help="zig target triple (default: aarch64-linux-gnu)")
    p.add_argument("--march", default=None, help="-march for the target in zig's spelling, e.g. x86_64_v4 (default: its baseline)")
    args = p.parse_args()
    try:
        import ziglang  # noqa: F401
    except ImportError:
        print("cross_build: needs the ziglang wheel (pip install ziglang)", file=sys.stderr)
        return 2
    omp = _omp_header_dir()
    if omp is None:
        print("cross_build: no omp.h from a host GCC found under /usr/lib/gcc", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ftwt-cross-") as tmp:
        return _compile_all(Path(tmp), omp, args.target, args.march)


def _compile_all(tmp: Path, omp: str, target: str, march: str | None) -> int:
    """Compile every source into ``tmp``; 0 when all compiled, else 1."""
    # omp.h alone on the include path: the host GCC's other headers are x86-specific.
    (tmp / "omp").mkdir()
    (tmp / "omp" / "omp.h").write_bytes((Path(omp) / "omp.h").read_bytes())
    includes = [str(tmp / "omp"), *include_paths(), sysconfig.get_paths()["include"]]
    flags = ["-std=c++20", "-O3", "-fopenmp", "-fPIC", *(["-march=" + march] if march else [])]
    failed = 0
    for src in SOURCES:
        cmd = [sys.executable, "-m", "ziglang", "c++", "-target", target, *flags,
               *(f"-isystem{d}" for d in includes), "-c", str(src), "-o", str(tmp / (src.stem + ".o"))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(f"{src.name}: {'compiled' if res.returncode == 0 else 'FAILED'} for {target}")
        if res.returncode != 0:
            failed += 1
            print(res.stderr[-4000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
