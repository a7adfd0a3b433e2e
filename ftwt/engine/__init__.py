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

Each convolution can run three ways: ``native`` (the fused kernels below where they apply),
``torch`` (PyTorch's ops on the kept block) and, for a gated unit, ``dense`` (every filter
from every input, the skipped ones zeroed afterwards: faster for units that keep nearly
all their filters, with more multiply-adds than the honest count; see
:meth:`SparseEngine.executed_macs`). ``kernel="auto"`` times them on the first input and
keeps the fastest per convolution (:mod:`ftwt.engine._choose`, :attr:`SparseEngine.choices`).

Kernels of the sparse ways (chosen per call from the shape, on CPU):
    * ``N*H'*W' <= 1024`` with a partial block (every gated layer of the CIFAR models, and
      ResNet-18's stages from 28x28 down at 224x224, at batch 1): im2col, then the native
      ``ftwt::gather_mm`` (``csrc/kernels.cpp``), which streams the chunks of each kept
      filter's weight row that its live inputs need, a block of filters x positions at a time in
      vector registers, with no copy of the weight block. On small maps each weight is used
      a handful of times, so the ``index_select`` copy of ``W[O][:, I]`` costs as much as the
      product, which the fused kernel avoids; it splits its tiles over the intra-op threads;
    * the gate of a ``pool = 1`` unit on a non-negative input: the native ``ftwt::gate_live``,
      one call for the per-channel sums (which give both the gate's pooled input and the live
      input channels), the gate's linear layer (rows split over the threads) and the kept filters;
    * every filter from every input channel (a unit that keeps all, common at r near 1):
      ``conv2d`` in channels-last with a channels-last copy of the folded weight made at build
      time (fixed shape, so oneDNN compiles its kernel once);
    * small maps without the native kernels (``kernel="torch"`` or no compiler): im2col + GEMM
      with positions as rows up to 49 positions, the block gathered by ``index_select``;
    * larger maps: ``conv2d`` (PyTorch's own im2col + GEMM below its oneDNN threshold, oneDNN
      for a shape the layer has met before) or im2col + GEMM; depthwise: ``conv2d`` on the kept
      channels only. Max-pooling goes through oneDNN on large inputs (PyTorch's NCHW kernel is
      much slower at batch 1).

The native kernels are built on first use by PyTorch's extension loader (C++ compiler and
``ninja``, once, cached per machine), for the widest vector ISA the CPU runs (AVX-512, AVX2,
SSE or NEON, each with register blocks that fit its register file; ``$FTWT_ENGINE_ISA``
builds another, e.g. ``avx2`` on an AVX-512 machine); where that fails the engine warns and
runs on PyTorch's ops with the same outputs and multiply-adds.

``engine.save(path)`` writes one safetensors file (the graph as JSON, the weights as
tensors, nothing pickled) that :meth:`SparseEngine.load` rebuilds without the model's code
(:mod:`ftwt.engine._artefact`). ``benchmarks/bench_engine.py`` times
the engine against the dense, masked and static models; its latest table (and what the
timings say) is in the README. What still limits it: the gates themselves (each reads its
``C_in x C_out`` weight once per sample, which a static model does not pay), oneDNN's direct
convolutions beating im2col + GEMM on large maps with few filters, and the small
Python-level ops of each unit, which dominate on tiny layers.

Example:
    >>> model = ftwt.attach_gates(ftwt.models.resnet56(), ftwt.GateConfig(threshold=0.9)).eval()
    >>> engine = SparseEngine(model)
    >>> logits = engine(torch.randn(1, 3, 32, 32))
    >>> engine.save("engine.safetensors")
    >>> SparseEngine.load("engine.safetensors").choices["conv1"]
    'native'
"""

from ftwt.engine.fold import fold_bn
from ftwt.engine.sparse_engine import SparseEngine, kept_filters

__all__ = ["SparseEngine", "fold_bn", "kept_filters"]
