"""How the engine lowers a convolution onto PyTorch's CPU kernels: im2col patches, and
PyTorch's own rule for when ``conv2d`` goes through oneDNN."""

from __future__ import annotations

from torch import Tensor


def _im2col(x: Tensor, k: tuple[int, int], stride: tuple[int, int], dil: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """``(C*kh*kw, N*H'*W')`` patches of an already padded ``(N, C, H, W)`` tensor."""
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.stride()
    # One strided copy; much faster on CPU than F.unfold, whose kernel copies element by element.
    view = x.as_strided((c, k[0], k[1], n, out_hw[0], out_hw[1]), (sc, dil[0] * sh, dil[1] * sw, sn, stride[0] * sh, stride[1] * sw))
    return view.reshape(c * k[0] * k[1], n * out_hw[0] * out_hw[1])


def _uses_onednn(x: Tensor, kernel: tuple[int, int]) -> bool:
    """PyTorch's rule for ``conv2d`` through oneDNN at batch 1; below it, its own im2col + GEMM
    (for which a channels-last copy of the input would only be copied back)."""
    return x.numel() > 20480 or min(kernel) > 3
