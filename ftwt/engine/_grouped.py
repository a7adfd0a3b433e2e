"""Depthwise and general grouped convolutions of :class:`ftwt.engine._conv.SparseConv`.

Rare in the models the engine serves except for depthwise layers (MobileNets), so both are
kept simple: depthwise convolutions run ``conv2d`` on the kept channels only, grouped ones
one gathered block per group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ftwt.engine._compact import Compact

if TYPE_CHECKING:
    from ftwt.engine._conv import SparseConv


def depthwise(conv: SparseConv, x: Compact, out: Tensor | None, hw: tuple[int, int]) -> Tensor:
    """One input channel per group: compute the kept filters whose input is live, bias for the rest."""
    m = conv.out_per_group
    outs = out if out is not None else torch.arange(conv.c_out, device=x.data.device)
    if x.idx is None and m == 1:
        src, valid = outs, None
    else:
        pos = torch.full((conv.c_in,), -1, dtype=torch.long, device=x.data.device)
        pos[x.indices()] = torch.arange(x.data.shape[1], device=x.data.device)
        src = pos[outs // m]
        valid = src >= 0
        if bool(valid.all()):
            valid = None
    both = outs if valid is None else outs[valid]
    if both.numel() == 0:
        return conv._bias_only(out, x.data.shape[0], hw, x.data)
    src = src if valid is None else src[valid]
    same = m == 1 and src.numel() == x.data.shape[1]  # every live input feeds a kept filter, in order
    xs = x.data if same else x.data.index_select(1, src)
    w = conv.weight.index_select(0, both)
    b = conv.bias.index_select(0, both) if conv.bias is not None else None
    if conv.padding_mode == "zeros":
        y = F.conv2d(xs, w, b, conv.stride, conv.padding, conv.dilation, both.numel())
    else:
        y = F.conv2d(conv._pad(xs), w, b, conv.stride, 0, conv.dilation, both.numel())
    if valid is None:
        return y
    full = conv._bias_only(out, x.data.shape[0], hw, x.data)
    return full.index_copy_(1, valid.nonzero().squeeze(1), y)


def grouped(conv: SparseConv, x: Compact, out: Tensor | None, hw: tuple[int, int]) -> Tensor:
    """General grouped convolution: one gathered block per group."""
    inp, outs = x.indices(), out if out is not None else torch.arange(conv.c_out, device=x.data.device)
    per_in, per_out = conv.in_per_group, conv.out_per_group
    pieces = []
    for g in range(conv.groups):
        in_g = ((inp >= g * per_in) & (inp < (g + 1) * per_in)).nonzero().squeeze(1)
        out_g = outs[(outs >= g * per_out) & (outs < (g + 1) * per_out)]
        if out_g.numel():
            xg = x.data.index_select(1, in_g)
            pieces.append(conv._dense_block(xg, inp[in_g] - g * per_in, out_g, hw))
    if not pieces:
        return x.data.new_zeros((x.data.shape[0], 0, *hw))
    return torch.cat(pieces, 1)
