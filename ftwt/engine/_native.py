"""The engine's native CPU kernels, built on first use with PyTorch's extension loader.

* :func:`gather_mm` computes ``W[O][:, I] @ cols`` (plus the bias of ``O``) without copying
  the weight block out first. On small maps at batch 1 (VGG's 4x4 and 2x2) each weight of
  the block is used a handful of times, so the copy that ``index_select`` + GEMM makes costs
  as much as the product itself; the fused kernel streams the needed chunks of each weight
  row once, a block of filters x positions at a time held in vector registers, blocked for the
  build's vector ISA (:func:`isa`: AVX-512, AVX2, SSE or NEON; ``$FTWT_ENGINE_ISA`` picks another).
* :func:`gather_dot`: the same product for maps of a few positions (VGG's 2x2 at batch 1),
  with the vectors along the weight rows instead of the positions; each weight read serves
  every position.
* :func:`conv_gather`: the kept filters' convolution (zero padding) in one call. Up to 4
  output positions it is :func:`gather_dot`; on larger maps a direct convolution
  (``csrc/conv_direct.cpp``) reads each vector of output columns straight from a padded copy
  of the input, without im2col (which writes every input value once per tap), each thread
  padding and computing its own band of rows or group of filters; rows too short for its
  vectors (4 columns in 16 lanes) go through im2col and :func:`gather_mm`. A strided 1x1 kernel
  takes the rows and columns it reads first and runs at stride 1.
* :func:`gate_live` runs a ``pool = 1`` gate and finds its unit's live input channels in one
  call instead of ten small ops.
* :func:`union_add`: a residual add of two compact values on the union of their channels.

All five are operators of the ``ftwt`` namespace (``csrc/kernels.cpp``) with flop formulas,
so :class:`torch.utils.flop_counter.FlopCounterMode` counts their multiply-adds. They are
compiled by :func:`torch.utils.cpp_extension.load` (a C++ compiler and ``ninja``,
once; the build is cached per machine under PyTorch's extensions folder,
``TORCH_EXTENSIONS_DIR``). Where they cannot be built the engine runs on PyTorch's own ops,
with the same results and a warning saying why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

from ftwt.errors import DeviceError

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "kernels.cpp", CSRC / "gather_dot.cpp", CSRC / "conv_direct.cpp")
HEADERS = (CSRC / "simd.h", CSRC / "checks.h", CSRC / "gather_dot.h", CSRC / "conv_direct.h")
KERNELS = ("auto", "native", "torch")
_BUILD_VERSION = 3  # bump when the build flags change

# Build variants by vector ISA: the kernel's register blocking follows the -march level
# (csrc/kernels.cpp), so an AVX2 build can be made and tested on any x86-64-v3 machine.
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    "avx2": ["-march=x86-64-v3"],
    "x86-64": ["-march=x86-64-v2"],
    "neon": [],  # AArch64 has NEON at its baseline
    "generic": [],
}
_X86_LEVELS = ("x86-64", "avx2", "avx512")
_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"}
_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ISA_ENV = "FTWT_ENGINE_ISA"  # build this variant instead of the best one the CPU runs


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def best_isa() -> str:
    """The widest vector ISA this CPU runs: ``avx512``, ``avx2``, ``x86-64``, ``neon`` or ``generic``."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        return "avx512" if _V4 | _V3 <= flags else "avx2" if _V3 <= flags else "x86-64"
    return "neon" if machine in ("aarch64", "arm64") else "generic"


def isa() -> str:
    """The variant the native kernels are built for: ``$FTWT_ENGINE_ISA``, else :func:`best_isa`.

    Raises:
        DeviceError: the requested variant is unknown or needs instructions this CPU lacks.
    """
    best, wanted = best_isa(), os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return best
    if wanted not in ISA_FLAGS:
        raise DeviceError(f"{ISA_ENV}={wanted!r} is not a kernel variant; choose from {sorted(ISA_FLAGS)}")
    runnable = _X86_LEVELS[: _X86_LEVELS.index(best) + 1] if best in _X86_LEVELS else (best, "generic")
    if wanted not in runnable:
        raise DeviceError(f"{ISA_ENV}={wanted}: this CPU runs only {list(runnable)}; unset it or pick one of those")
    return wanted


def _build_name(variant: str) -> str:
    key = f"{variant}|{torch.__version__}|{_BUILD_VERSION}|".encode() + b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    digest = hashlib.sha1(key).hexdigest()[:12]
    return f"ftwt_kernels_{variant.replace('-', '_')}_{digest}"


_loaded: list[str] = []  # the variant built into this process (one: the ftwt op namespace is global)


def loaded_isa() -> str | None:
    """The variant of the native kernels loaded in this process, or None."""
    return _loaded[0] if _loaded else None


@functools.cache
def _load() -> str | None:
    """Build (or load the cached build of) the kernel; None when it works, else why not."""
    if hasattr(torch.ops.ftwt, "union_add"):
        return None
    try:
        # Its import warns on machines with a CUDA_HOME but no CUDA runtime: not our concern here.
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            cpp_log.setLevel(level)

        variant = isa()
        # OpenMP: at::parallel_for splits the filters over PyTorch's intra-op threads only
        # when the including code is built with it (PyTorch's own CPU builds use GNU OpenMP).
        flags = ["-O3", "-fopenmp", *ISA_FLAGS[variant]]
        load(name=_build_name(variant), sources=[str(f) for f in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        _loaded.append(variant)
    except DeviceError as exc:
        return str(exc)
    except Exception as exc:  # no compiler, no ninja, a read-only cache folder, ...
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    _register_flop_formula()
    return None


def _register_flop_formula() -> None:
    from torch.utils.flop_counter import register_flop_formula

    # Two flops per multiply-add, as FlopCounterMode counts a matrix product.
    @register_flop_formula(torch.ops.ftwt.gather_mm)
    def _gather_mm_flops(w_shape, cols_shape, out_idx_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * out_idx_shape[0] * cols_shape[0] * cols_shape[1]

    @register_flop_formula(torch.ops.ftwt.gather_dot)
    def _gather_dot_flops(w_shape, cols_t_shape, out_idx_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * out_idx_shape[0] * cols_t_shape[0] * cols_t_shape[1]

    @register_flop_formula(torch.ops.ftwt.conv_gather)
    def _conv_gather_flops(x_shape, w_shape, out_idx_shape, in_idx_shape, kernel, *args, out_shape=None, **kwargs) -> int:
        return 2 * out_shape[0] * in_idx_shape[0] * kernel[0] * kernel[1] * out_shape[1]

    @register_flop_formula(torch.ops.ftwt.gate_live)
    def _gate_live_flops(data_shape, idx_shape, c_in, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * w_shape[0] * w_shape[1]  # the gate's linear layer (pooling is not counted)


def available(kernel: str = "auto") -> bool:
    """Whether the engine uses the native kernel under this ``kernel`` setting.

    Args:
        kernel: ``"auto"`` (build it if possible, else warn once and use PyTorch's ops),
            ``"native"`` (it must build) or ``"torch"`` (never use it).

    Raises:
        DeviceError: ``kernel="native"`` and the kernel cannot be built here.
    """
    if kernel == "torch":
        return False
    why = _load()
    if why is None:
        return True
    if kernel == "native":
        raise DeviceError(f"the native engine kernel could not be built ({why}); use kernel='torch' or install a C++ compiler and ninja")
    _warn_once(why)
    return False


@functools.cache
def _warn_once(why: str) -> None:
    log.warning("ftwt engine: native kernel unavailable (%s); using PyTorch ops (same results, slower on small maps)", why)


def gather_mm(weight: Tensor, cols: Tensor, out_idx: Tensor, in_idx: Tensor, taps: int, bias: Tensor | None) -> Tensor:
    """``(|O|, P)``: rows ``out_idx`` of ``weight`` (``(C_out, C_in * taps)``), restricted to the
    ``taps``-wide column chunks of ``in_idx``, times ``cols`` (``(|I| * taps, P)``), plus ``bias[out_idx]``."""
    return torch.ops.ftwt.gather_mm(weight, cols, out_idx, in_idx, taps, bias)


def gather_dot(weight: Tensor, cols_t: Tensor, out_idx: Tensor, in_idx: Tensor, taps: int, bias: Tensor | None) -> Tensor:
    """:func:`gather_mm` with the positions as rows: ``cols_t`` is ``(P, |I| * taps)``; returns ``(|O|, P)``."""
    return torch.ops.ftwt.gather_dot(weight, cols_t, out_idx, in_idx, taps, bias)


def conv_gather(
    x: Tensor, weight: Tensor, out_idx: Tensor, in_idx: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int], bias: Tensor | None,
) -> Tensor:
    """``(|O|, N*H'*W')``: the convolution (zero padding) of ``x`` ``(N, |I|, H, W)``, the live
    input channels ``in_idx``, by the kept filters ``out_idx`` of ``weight``
    ``(C_out, C_in*kh*kw)``, by the direct convolution, :func:`gather_dot` or im2col and
    :func:`gather_mm` (module docstring)."""
    return torch.ops.ftwt.conv_gather(x, weight, out_idx, in_idx, kernel, stride, padding, dilation, bias)


def gate_live(
    data: Tensor, idx: Tensor, c_in: int, gate_w: Tensor, gate_b: Tensor | None, softmax: bool, decision: float
) -> tuple[Tensor, Tensor, Tensor]:
    """A ``pool = 1`` gate on one sample's compact non-negative input ``data`` ``(1, k, H, W)``
    (channels ``idx`` of ``c_in``): its logits ``(1, C_out)``, the filters it keeps (ascending)
    and the positions in ``data`` of the channels that are not all zero (ascending)."""
    return torch.ops.ftwt.gate_live(data, idx, c_in, gate_w, gate_b, softmax, decision)


def union_add(a: Tensor, a_idx: Tensor, b: Tensor, b_idx: Tensor) -> tuple[Tensor, Tensor]:
    """``a + b`` of two compact values (channels ``a_idx`` and ``b_idx``, ascending, of one
    tensor): the data of the union of their channels and its indices, ascending."""
    return torch.ops.ftwt.union_add(a, a_idx, b, b_idx)
