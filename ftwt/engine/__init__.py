"""Sparse inference engine: real speedup from FTWT gates (the issue "Real speedup").

A gated model in PyTorch still computes every filter and multiplies the skipped ones by
zero. :class:`SparseEngine` compiles it (``torch.fx``) into a flat plan that, per sample,
evaluates each gate first on the compact input of its unit, then computes only the kept
filters from only the non-zero input channels, with BatchNorm folded into the
convolutions (:func:`fold_bn`). Activations travel between layers as compact tensors (the
data of the live channels plus their indices); residual adds take the union of channels,
option-A channel padding and concatenation only move indices, and a value is widened to
full width only where an op needs it (flatten, linear layers, unknown ops). The
multiply-adds done for one sample are exactly those :class:`ftwt.flops.FlopsMeter` counts.

Kernels (chosen per call from the shape, on CPU):
    * ``H'*W' <= 49``: im2col + GEMM with positions as rows (MKL is 3-6x faster than
      oneDNN's or PyTorch's conv here; ResNet-18's 7x7 and VGG's 4x4/2x2 layers);
    * ``49 < H'*W' <= 4096``: im2col (one strided copy) + GEMM ``W[O][:, I] @ cols``. oneDNN
      JIT-compiles a kernel for every new ``(|I|, |O|)`` (~0.5 ms each), which sparse layers
      meet at almost every sample; a shape seen before in that layer runs through oneDNN;
    * larger maps (stems): ``conv2d``; depthwise: ``conv2d`` on the kept channels only.
    Weights are gathered in one ``index_select`` of ``(filter, input)`` rows (int32 index);
    max-pooling goes through oneDNN (PyTorch's NCHW kernel is ~20x slower at batch 1).

Measured (AMD EPYC (Zen 4) VM, 2 cores shared with other jobs, torch 2.14 CPU, batch 1,
``torch.inference_mode``, fresh samples with their ground-truth masks replayed through
``masks=``, random-init models with calibrated BN, medians; ideal = dense MACs / dynamic
MACs, gates included; "dense" is the plain NCHW eval model, "dense-CL" the same in
channels-last, "masked" the gated model applying ground-truth masks)::

    model           thr  reduction  dense  dense-CL  masked  engine  ideal  realized  ratio
    VGG16-BN 32x32   1     54.8%    22.6    14.5     28.9    14.7    2.21   1.53      0.69
    VGG16-BN 32x32   2     54.8%    11.8    10.1     16.8    10.4    2.21   1.14      0.52
    ResNet-18 224    1     57.1%    52.6    48.8     60.1    36.0    2.33   1.46      0.63
    ResNet-18 224    2     57.4%    37.3    34.2      -      45.6    2.35   0.82      0.35
    at r = 1 (few dead filters), 1 thread: VGG16-BN 20.6 ms dense vs 18.3 ms engine,
    ResNet-18 57.5 vs 57.4 ms.

Timings on this shared machine vary by +-20% between runs (and 2-thread runs by far more,
as OpenMP waits for a descheduled thread); re-run on a quiet machine for final numbers.
What limits the ratio: oneDNN pads channels to blocks of 16 and MKL's GEMM reaches only
~60% of oneDNN's speed with few output filters (ResNet-18's 56x56 stage), and layers with
tiny maps are bound by reading the kept filters' weights (``|O|/C_out`` of them) rather
than by multiply-adds.

Example:
    >>> model = ftwt.attach_gates(ftwt.models.resnet56(), ftwt.GateConfig(threshold=0.9)).eval()
    >>> engine = SparseEngine(model)
    >>> logits = engine(torch.randn(1, 3, 32, 32))
"""

from ftwt.engine.fold import fold_bn
from ftwt.engine.sparse_engine import SparseEngine

__all__ = ["SparseEngine", "fold_bn"]
