"""One convolution of the sparse engine: gate first, then only the kept filters on the live inputs.

A :class:`SparseConv` replaces ``conv -> [BatchNorm] -> [mask] -> [activation]``. The BN is
folded into the weight at build time. At run time the gate reads the compact input, the
mask picks the output filters ``O``, the live input channels ``I`` are the non-zero ones,
and the ``|O| x |I|`` block of the weight is gathered in one ``index_select`` and used by
one GEMM or ``conv2d`` call, so the multiply-adds are exactly those
:class:`ftwt.flops.FlopsMeter` counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftwt._ops import ACTIVATIONS
from ftwt.engine import _choose, _native
from ftwt.engine._compact import Compact, live_channels
from ftwt.engine._grouped import depthwise, grouped
from ftwt.engine._lowering import _im2col, _uses_onednn
from ftwt.engine.fold import fold_bn
from ftwt.errors import ConfigError, UnsupportedLayerError
from ftwt.unit import GatedUnit

# Up to this many output positions (N*H'*W') a convolution is im2col + one MKL GEMM: it needs
# no per-shape kernel compilation, unlike oneDNN's conv2d (benchmarks/bench_engine.py).
GEMM_MAX_POSITIONS = 4096
# Up to this many positions they are the GEMM's rows rather than its columns.
GEMM_ROWS_MAX_POSITIONS = 49
# Up to this many output positions a gathered block goes through the fused native kernels
# (when built): they read the kept weights in place and convolve the padded input directly,
# without im2col, up to ResNet-18's 112x112 stem at batch 1 (benchmarks/bench_engine.py).
NATIVE_MAX_POSITIONS = 16384
# Up to this many weight values, a (filters, inputs) block is gathered one dimension at a time.
_SMALL_WEIGHT = 65536
_SEEN_SHAPES = 16  # shapes remembered per layer: oneDNN's kernel cache holds 1024 in all


class SparseConv:
    """A convolution (+ folded BN, + optional gate, + optional activation) on :class:`Compact` values.

    Args:
        name: the convolution's qualified name (the key of ``masks=``).
        conv: the convolution.
        bn: the BatchNorm after it, folded in, or None.
        unit: its gated unit, or None for a convolution that computes every filter.
        act: activation applied to the output (a key of ``ftwt._ops.ACTIVATIONS``) or None.
        round_to: round each kept-filter count up to a multiple of this (extra filters are
            computed, then zeroed).
        trim_inputs: drop input channels that are all zero before computing.
        native: the fused native kernels (:mod:`ftwt.engine._native`) may be used (mode "native").
    """

    def __init__(
        self,
        name: str,
        conv: nn.Conv2d,
        bn: nn.Module | None,
        unit: GatedUnit | None,
        act: str | None,
        round_to: int = 1,
        trim_inputs: bool = True,
        native: bool = False,
    ) -> None:
        self.name, self.unit, self.round_to, self.trim_inputs = name, unit, round_to, trim_inputs
        # in place: a fresh conv output is the engine's own buffer
        self.act = ACTIVATIONS[act].inplace if act is not None else None
        self.nonneg = act is not None and ACTIVATIONS[act].nonneg
        weight, bias = fold_bn(conv, bn)
        self.c_in, self.c_out, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel = tuple(conv.kernel_size)
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        self.padding = self._padding(conv)
        self.padding_mode = conv.padding_mode
        self.in_per_group = self.c_in // self.groups
        self.out_per_group = self.c_out // self.groups
        kk = self.kernel[0] * self.kernel[1]
        self.weight = weight.contiguous()  # (C_out, C_in/g, kh, kw)
        # One row per (filter, input) pair; 1x1 kernels gather single values from a flat view.
        self.rows = self.weight.view(self.c_out * self.in_per_group, kk) if kk > 1 else self.weight.view(-1)
        # int32 row offsets: building the (|O|, |I|) gather index is cheaper than in int64.
        self.row_base = torch.arange(self.c_out, dtype=torch.int32, device=weight.device) * self.in_per_group
        self.bias = bias
        self.no_filter = torch.zeros(self.c_out, dtype=torch.bool, device=weight.device)
        dense_kernel = self.groups == 1 and kk > 1 and self.padding_mode == "zeros" and weight.device.type == "cpu"
        self.weight_cl = self.weight.contiguous(memory_format=torch.channels_last) if dense_kernel else None
        self._seen: set[tuple[int, ...]] = set()
        native = native and weight.dtype == torch.float32 and weight.device.type == "cpu"
        self.can_native = native and self.groups == 1  # gather_mm
        if native:
            self.w2d = self.weight.view(self.c_out, self.in_per_group * kk)
            self.all_out = torch.arange(self.c_out)
            self.all_in = torch.arange(self.c_in)
        if unit is not None:
            fc = unit.gate.fc
            self.gate_w, self.gate_b = fc.weight.detach(), fc.bias.detach() if fc.bias is not None else None
            self.gate_pool, self.gate_softmax = unit.gate.pool, unit.gate.softmax
        # The fused paths compute the reference gate (average pool, one linear layer); the
        # native one also decides by threshold. Other gates run as the model's own module.
        self.fused_gate = unit is not None and unit.gate.is_reference and self.gate_pool == 1
        self.can_native_gate = native and self.fused_gate and unit.config.rule == "threshold" and trim_inputs
        # Ways to run this layer that SparseEngine(kernel="auto") times against each other.
        with_native = self.can_native or self.can_native_gate
        self.modes = ("torch",) + (("native",) if with_native else ()) + (("dense",) if unit is not None else ())
        self.set_mode("native" if with_native else "torch")
        self.pending = 0  # set by the engine: choose the mode over the next calls, this many
        self.times: dict[str, float] = {}  # seconds per mode, summed over the calls timed

    def set_mode(self, mode: str) -> None:
        """How to compute: ``"native"`` (fused kernels on small maps), ``"torch"`` (PyTorch's ops on
        the kept block) or ``"dense"`` (every filter from every input, the others zeroed)."""
        if mode not in self.modes:
            raise ConfigError(f"{self.name}: mode {mode!r} is not available here; choose from {list(self.modes)}")
        self.mode = mode
        self.native = self.can_native and mode == "native"
        # The fused native gate serves the dense mode too: it is the gate, not the product.
        self.native_gate = self.can_native_gate and mode != "torch"

    def _padding(self, conv: nn.Conv2d) -> tuple[int, int]:
        if not isinstance(conv.padding, str):
            return tuple(conv.padding)
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise UnsupportedLayerError(f"{self.name}: padding='same' with an asymmetric pad is not supported")
        return (total[0] // 2, total[1] // 2)

    # Gate -------------------------------------------------------------------------
    def gate(self, x: Compact) -> tuple[Tensor, Tensor | None]:
        """Gate logits ``(N, C_out)`` from the compact input, as :class:`ftwt.gate.Gate` computes them,
        and the kept filters' scale (None unless the gate has a saliency head)."""
        if not self.unit.gate.is_reference:
            data = x.data
            if x.idx is not None:
                # Channels not stored are zero: pooled (average or max) they give zero features.
                data = data.new_zeros((data.shape[0], self.c_in, *data.shape[2:])).index_copy_(1, x.idx, data)
            return self.unit.gate.heads(data)
        pooled = F.adaptive_avg_pool2d(x.data, self.gate_pool)
        if x.idx is not None:
            # Channels not stored are zero, so they pool to zero; softmax still sees them.
            full = pooled.new_zeros((pooled.shape[0], self.c_in, *pooled.shape[2:]))
            pooled = full.index_copy_(1, x.idx, pooled)
        z = pooled.flatten(1)
        if self.gate_softmax:
            z = z.softmax(dim=1)
        return F.linear(z, self.gate_w, self.gate_b), None

    def _select(
        self, logits: Tensor, masks: dict[str, Tensor] | None, kept: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, bool]:
        """Kept filters ``O`` (ascending; None for all), the ``(N, C_out)`` mask, and whether ``O`` holds extra filters.

        ``kept``: the gate's kept filters of a single sample, already found (the mask is then None).
        """
        if kept is not None and self.round_to == 1 and (masks is None or self.name not in masks):
            return (None if kept.numel() == self.c_out else kept), None, False
        if masks is not None and self.name in masks:
            mask = masks[self.name]
            if mask.dim() == 1:  # one sample's kept filters (SparseEngine.forward checked them)
                if self.round_to == 1:
                    return (None if mask.numel() == self.c_out else mask.to(logits.device)), None, False
                mask = torch.zeros_like(logits, dtype=torch.bool).index_fill_(1, mask.to(logits.device), True)
            if mask.dtype != torch.bool or mask.device != logits.device:
                mask = mask.to(device=logits.device, dtype=torch.bool)
            if mask.shape != logits.shape:
                raise ConfigError(f"masks[{self.name!r}] has shape {tuple(mask.shape)}, expected {tuple(logits.shape)}")
        else:
            mask = self.unit.decide(logits)
        # Views instead of select/squeeze: two fewer dispatched ops per unit and sample.
        keep = mask.reshape(-1) if mask.shape[0] == 1 else mask.any(0)
        out = keep.nonzero().view(-1)
        extra = False
        if out.numel() == self.c_out:
            return None, mask, False
        if self.round_to > 1:
            target = min(-(-out.numel() // self.round_to) * self.round_to, self.c_out)
            if target > out.numel():
                # Fill up with the most likely of the filters not kept.
                score = torch.sigmoid(logits).amax(0).masked_fill(keep, -1.0)
                out = torch.cat([out, score.topk(target - out.numel()).indices]).sort().values
                extra = True
        return out, mask, extra

    # Compute ----------------------------------------------------------------------
    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.padding
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _pad(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        if not (ph or pw):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (pw, pw, ph, ph), mode=mode)

    def _bias_only(self, out: Tensor | None, n: int, hw: tuple[int, int], like: Tensor) -> Tensor:
        """Filters whose inputs are all zero output their (folded) bias: no multiply-adds."""
        count = self.c_out if out is None else out.numel()
        if self.bias is None:
            return like.new_zeros((n, count, *hw))
        b = self.bias if out is None else self.bias.index_select(0, out)
        return b.view(1, -1, 1, 1).expand(n, count, *hw).contiguous()

    def _dense_block(self, x: Tensor, inp: Tensor | None, out: Tensor | None, hw: tuple[int, int]) -> Tensor:
        """Filters ``out`` (None: all) from the input channels ``inp`` (None: all) of one group."""
        n = x.shape[0]
        if inp is not None and inp.numel() == 0:
            return self._bias_only(out, n, hw, x)
        if self.native and n * hw[0] * hw[1] <= NATIVE_MAX_POSITIONS and x.dtype == torch.float32:
            return self._fused(x, inp, out, hw)
        if inp is None and out is None and self.groups == 1:
            return self._compute(x, self.weight, self.bias, hw)
        w, b = self._gather(inp, out)
        return self._compute(x, w, b, hw)

    def _all_filters(self, x: Compact, hw: tuple[int, int]) -> Tensor:
        """Every filter from the full-width input (one fixed shape: oneDNN compiles its kernel once), for
        units that keep (nearly) all, where faster than the honest count; the caller zeroes the others."""
        data = x.dense()
        if self.groups == 1:
            y = self._compute(data, self.weight, self.bias, hw)
        elif self.padding_mode == "zeros":
            y = F.conv2d(data, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.conv2d(self._pad(data), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return y

    def _zero_others(self, y: Tensor, kept: Tensor) -> Tensor:
        """``y`` with all but ``kept`` zeroed in place (a gather would copy all of it, and the next layer back)."""
        others = self.no_filter.index_fill(0, kept, True).logical_not_().nonzero().view(-1)
        return y.index_fill_(1, others, 0.0)

    def _fused(self, x: Tensor, inp: Tensor | None, out: Tensor | None, hw: tuple[int, int]) -> Tensor:
        """``conv2d(x, W[out][:, inp], b[out])`` by the native kernels: no copy of the weight block."""
        n = x.shape[0]
        outs = self.all_out if out is None else out
        ins = self.all_in if inp is None else inp
        if self.padding_mode == "zeros":
            y = _native.conv_gather(x, self.w2d, outs, ins, self.kernel, self.stride, self.padding, self.dilation, self.bias)
        else:
            cols = _im2col(self._pad(x), self.kernel, self.stride, self.dilation, hw).contiguous()
            y = _native.gather_mm(self.w2d, cols, outs, ins, self.kernel[0] * self.kernel[1], self.bias)
        o = outs.numel()
        return y.view(o, n, *hw).transpose(0, 1) if n > 1 else y.view(1, o, *hw)

    def _gather(self, inp: Tensor | None, out: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Weight block ``W[out][:, inp]`` and bias ``b[out]`` (None: all)."""
        kh, kw = self.kernel
        if inp is None and out is None:
            w, b = self.weight, self.bias
        elif inp is None:
            w, b = self.weight.index_select(0, out), self.bias.index_select(0, out) if self.bias is not None else None
        elif out is None or self.weight.numel() <= _SMALL_WEIGHT:
            # Small weights (ResNet-56) or all filters: per-dimension gathers beat building a row index.
            w = self.weight if out is None else self.weight.index_select(0, out)
            w = w.index_select(1, inp)
            b = self.bias if self.bias is None or out is None else self.bias.index_select(0, out)
        else:
            base = self.row_base.index_select(0, out)
            rows = torch.add(base[:, None], inp.to(torch.int32)).view(-1)
            w = self.rows.index_select(0, rows).view(base.numel(), inp.numel(), kh, kw)
            b = self.bias if self.bias is None or out is None else self.bias.index_select(0, out)
        return w, b

    def _compute(self, x: Tensor, w: Tensor, b: Tensor | None, hw: tuple[int, int]) -> Tensor:
        """``conv2d(x, w, b)`` (stride, padding and dilation of this layer) by the fastest CPU kernel for its shape."""
        n, o, cin = x.shape[0], w.shape[0], w.shape[1]
        kh, kw = self.kernel
        rows = n * hw[0] * hw[1]
        if kh == kw == 1 and self.padding == (0, 0):
            # Pointwise: the NCHW data already is the GEMM operand (C_in, N*H*W), no im2col.
            sh, sw = self.stride
            xs = x if sh == sw == 1 else x[:, :, ::sh, ::sw]
            cols = xs.reshape(cin, rows) if n == 1 else xs.transpose(0, 1).reshape(cin, rows)
            return self._gemm(cols, w.reshape(o, cin), b, n, hw)
        if w is self.weight and self.weight_cl is not None and rows > GEMM_ROWS_MAX_POSITIONS and _uses_onednn(x, self.kernel):
            # Every filter from every input: one fixed shape, so oneDNN compiles its kernel once;
            # in channels-last it beats NCHW conv2d and im2col + GEMM. The
            # output stays channels-last; later ops read it through its strides.
            x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, self.weight_cl, b, self.stride, self.padding, self.dilation)
        if rows > GEMM_MAX_POSITIONS or (rows > GEMM_ROWS_MAX_POSITIONS and self._conv2d_is_cheap(x, o)):
            if self.padding_mode == "zeros":
                return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
            return F.conv2d(self._pad(x), w, b, self.stride, 0, self.dilation)
        cols = _im2col(self._pad(x), self.kernel, self.stride, self.dilation, hw)
        return self._gemm(cols, w.reshape(o, cin * kh * kw), b, n, hw)

    @staticmethod
    def _gemm(cols: Tensor, w: Tensor, b: Tensor | None, n: int, hw: tuple[int, int]) -> Tensor:
        """``w (|O|, K) @ cols (K, N*H'*W')`` as an ``(N, |O|, H', W')`` activation."""
        o, rows = w.shape[0], cols.shape[1]
        if rows <= GEMM_ROWS_MAX_POSITIONS:
            # Few positions: positions as GEMM rows; MKL is slower with them as columns.
            y = F.linear(cols.t(), w, b)
            return y.view(n, hw[0], hw[1], o).permute(0, 3, 1, 2)
        y = torch.mm(w, cols)
        if b is not None:
            y += b[:, None]  # addmm would copy the bias to every position, unvectorized
        return y.view(o, n, *hw).transpose(0, 1) if n > 1 else y.view(1, o, *hw)

    def _conv2d_is_cheap(self, x: Tensor, out: int) -> bool:
        """Whether ``conv2d`` needs no new kernel for this shape: PyTorch's own im2col + GEMM, or a seen oneDNN shape.

        Below PyTorch's oneDNN threshold ``conv2d`` is its slow path (im2col + the same MKL
        GEMM) with padding and bias fused, which saves our pad, copy and bias ops on tiny
        layers (ResNet-56). oneDNN JIT-compiles a kernel per new shape, which a
        sparse layer meets at almost every call unless its masks repeat; a repeated shape
        runs faster through oneDNN than through im2col + MKL's GEMM.
        """
        kh, kw = self.kernel
        if not _uses_onednn(x, self.kernel):
            return x.shape[0] == 1 and self.groups == 1
        return self._seen_before(x, out)

    def _seen_before(self, x: Tensor, out: int) -> bool:
        """Whether this layer met this input shape and filter count before (remembering up to ``_SEEN_SHAPES``)."""
        key = (*x.shape, out)
        if key in self._seen:
            return True
        if len(self._seen) < _SEEN_SHAPES:
            self._seen.add(key)
        return False

    def _gate_and_trim(self, x: Compact, trim: bool = True) -> tuple[Compact, Tensor]:
        """Gate logits and the live input channels from one reduction (non-negative 4-D input, ``pool = 1``).

        For values >= 0 a channel's sum is zero exactly when the channel is all zero (the sum
        is at least its largest term), and ``sum / (H*W)`` is how ``adaptive_avg_pool2d``
        computes the mean, so one ``sum`` serves both the liveness test and the gate.
        """
        data = x.data
        sums = data.sum((2, 3))  # (N, k)
        live = sums[0] != 0 if data.shape[0] == 1 else (sums != 0).any(0)
        pooled = sums.div_(data.shape[2] * data.shape[3])
        if x.idx is not None:
            pooled = pooled.new_zeros((pooled.shape[0], self.c_in)).index_copy_(1, x.idx, pooled)
        if self.gate_softmax:
            pooled = pooled.softmax(dim=1)
        logits = F.linear(pooled, self.gate_w, self.gate_b)
        if trim and not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            idx = keep if x.idx is None else x.idx.index_select(0, keep)
            x = Compact(data.index_select(1, keep), idx, x.channels, x.nonneg)
        return x, logits

    def _gate_and_trim_native(self, x: Compact, trim: bool = True) -> tuple[Compact, Tensor, Tensor]:
        """:meth:`_gate_and_trim` for one float32 CPU sample in one native call; also the gate's kept filters."""
        data = x.data
        idx = self.all_in if x.idx is None else x.idx
        logits, kept, live = _native.gate_live(
            data, idx, self.c_in, self.gate_w, self.gate_b, self.gate_softmax, self.unit.decision
        )
        if trim and live.numel() != data.shape[1]:
            x = Compact(data.index_select(1, live), idx.index_select(0, live), x.channels, x.nonneg)
        return x, logits, kept

    def __call__(self, x: Compact, masks: dict[str, Tensor] | None = None) -> Compact:
        if self.pending:  # kernel="auto": time every mode on this input, keep the fastest
            self.pending -= 1
            _choose.choose(self, x, masks)
        out, mask, extra, scale = None, None, False, None
        trim = self.mode != "dense"  # the dense mode reads every input channel anyway
        if self.native_gate and x.nonneg and x.data.dim() == 4 and x.data.shape[0] == 1 and x.data.shape[1] and x.data.dtype == torch.float32:
            x, logits, kept = self._gate_and_trim_native(x, trim)
            out, mask, extra = self._select(logits, masks, kept)
        elif self.unit is not None and self.trim_inputs and self.fused_gate and x.nonneg and x.data.dim() == 4 and x.data.shape[1]:
            x, logits = self._gate_and_trim(x, trim)
            out, mask, extra = self._select(logits, masks)
        else:
            if self.trim_inputs and trim:
                x = live_channels(x)
            if self.unit is not None:
                logits, scale = self.gate(x)
                out, mask, extra = self._select(logits, masks)
        hw = self._out_hw(*x.data.shape[2:])
        n = x.data.shape[0]
        if out is not None and out.numel() == 0:
            return Compact(x.data.new_zeros((n, 0, *hw)), out, self.c_out, True)
        dense_kept = None  # dense mode: the kept filters, the others zeroed in the full output
        if self.mode == "dense":
            y, dense_kept, out = self._all_filters(x, hw), out, None
        elif self.groups == 1:
            y = self._dense_block(x.data, x.idx, out, hw)
        elif self.in_per_group == 1:
            y = depthwise(self, x, out, hw)
        else:
            y = grouped(self, x, out, hw)
        factor = scale  # one product for the mask and the saliency scale
        if mask is not None and (n > 1 or extra):  # zero the filters kept only for another sample or for rounding
            factor = mask.to(y.dtype) if scale is None else mask * scale
        if factor is not None:
            y = y * (factor if out is None else factor.index_select(1, out)).to(y.dtype)[:, :, None, None]
        if self.act is not None:
            y = self.act(y)
        if dense_kept is not None:
            y = self._zero_others(y, dense_kept)
        return Compact(y, out, self.c_out, self.nonneg)
