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
    * every filter from every input channel (a unit that keeps all, common at r near 1):
      ``conv2d`` in channels-last with a channels-last copy of the folded weight made at build
      time. The shape is fixed, so oneDNN compiles its kernel once, and it runs 1.2-1.4x faster
      than NCHW ``conv2d`` or im2col + GEMM on small maps;
    * ``49 < H'*W' <= 4096``, below PyTorch's oneDNN threshold (batch 1, ``C*H*W <= 20480``,
      kernels up to 3x3): ``conv2d``, i.e. PyTorch's own im2col + MKL GEMM with padding and
      bias fused (no pad, copy and bias ops of ours; ResNet-56's layers);
    * ``49 < H'*W' <= 4096`` above it: im2col (one strided copy) + GEMM ``W[O][:, I] @ cols``.
      oneDNN JIT-compiles a kernel for every new ``(|I|, |O|)`` (~0.5 ms each), which sparse
      layers meet at almost every sample; a shape seen before in that layer runs through oneDNN;
    * larger maps (stems): ``conv2d``; depthwise: ``conv2d`` on the kept channels only.
    The weight block is gathered by ``index_select`` along the input dimension when all filters
    are kept or the weight is small (<= 64K values), else in one ``index_select`` of
    ``(filter, input)`` rows (int32 index); max-pooling goes through oneDNN (PyTorch's NCHW
    kernel is ~20x slower at batch 1). For a non-negative input (after ReLU) with a ``pool = 1``
    gate, one ``sum`` per channel gives both the live input channels and the gate's pooled input.

Measured while other work ran (AMD EPYC (Zen 4) VM, 2 cores, a test suite running alongside
most of the time, torch 2.14 CPU, batch 1, ``torch.inference_mode``, 8 digits samples with their
ground-truth masks replayed through ``masks=``, random-init models; medians of interleaved runs
in one process; "before" is the engine preceding the kernel changes above, ideal = dense MACs /
dynamic MACs, gates included; ratio = realized / ideal speedup)::

    model           thr    r   ideal  dense  before (ratio)  engine (ratio)
    ResNet-56         1   1     1.03    8.3   11.8 (0.68)    10.3 (0.78)
    ResNet-56         1   0.85  2.31   11.9   16.9 (0.30)    13.8 (0.37)
    VGG16-BN 32x32    1   1     1.07   20.9   20.4 (0.95)    19.8 (0.98)
    VGG16-BN 32x32    1   0.9   2.11   21.3   14.9 (0.68)    14.4 (0.71)
    VGG16-BN 32x32    1   0.85  2.68   22.9   14.1 (0.61)    13.3 (0.64)
    VGG16-BN 32x32    2   1     1.07   14.6   22.8 (0.60)    22.4 (0.61)
    VGG16-BN 32x32    2   0.9   2.11   13.6   16.8 (0.38)    17.3 (0.37)
    ResNet-18 224     1   1     1.08   49.1   52.9 (0.86)    53.4 (0.85)
    ResNet-18 224     1   0.85  2.18   53.4   36.6 (0.67)    35.6 (0.69)

Timings on this shared machine vary by +-20% between runs (dense ResNet-56 read 8.3 and
11.9 ms minutes apart), and 2-thread runs by far more, as OpenMP waits for a descheduled
thread; re-run on a quiet machine for final numbers. With two threads the engine still loses to
dense: per-op profiles show the weight gathers (``index_select``, ~30% of VGG16's engine time)
and MKL's GEMMs with few positions (``addmm`` on the 4x4/2x2 maps) barely speed up with a
second thread, while oneDNN's dense convolutions do; running the small ops single-threaded
(``torch.set_num_threads`` around each kernel, cheap at ~0.2 us) did not help. At r = 1 ResNet-56
is still ~20% slower than dense: its per-unit gate, liveness test and mask selection are ~10
small ops of ~3 us each against ~100 us of convolution. What limits the ratio elsewhere:
oneDNN pads channels to blocks of 16 and MKL's GEMM reaches only ~60% of oneDNN's speed with
few output filters (ResNet-18's 56x56 stage), and layers with tiny maps are bound by reading
the kept filters' weights (``|O|/C_out`` of them) rather than by multiply-adds.

Example:
    >>> model = ftwt.attach_gates(ftwt.models.resnet56(), ftwt.GateConfig(threshold=0.9)).eval()
    >>> engine = SparseEngine(model)
    >>> logits = engine(torch.randn(1, 3, 32, 32))
"""

from ftwt.engine.fold import fold_bn
from ftwt.engine.sparse_engine import SparseEngine

__all__ = ["SparseEngine", "fold_bn"]
