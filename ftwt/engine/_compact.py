"""Compact activations: the data of a layer's live channels plus their channel indices.

Between layers the engine passes :class:`Compact` values instead of full tensors: only the
channels that a gate kept (or that are otherwise non-zero) are stored, so element-wise and
pooling ops run on less data and the next convolution knows which input channels it has to
read. A value is widened to a full, zero-filled tensor only where an op needs full width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ftwt.engine import _native


class Compact:
    """Channels ``idx`` of an ``(N, channels, *spatial)`` activation; every other channel is zero.

    Attributes:
        data: ``(N, k, *spatial)`` values of the stored channels (any memory format).
        idx: ``(k,)`` int64 channel indices, ascending, or None when all channels are stored.
        channels: width of the full tensor.
        nonneg: every stored value is known to be >= 0 (after ReLU), which makes the
            all-zero-channel test one reduction instead of two.
    """

    __slots__ = ("data", "idx", "channels", "nonneg")

    def __init__(self, data: Tensor, idx: Tensor | None, channels: int, nonneg: bool = False) -> None:
        self.data = data
        # Ascending unique indices covering every channel are the identity: drop them, so
        # consumers take their all-channels fast paths (no gathers).
        self.idx = None if idx is not None and idx.numel() == channels else idx
        self.channels = channels
        self.nonneg = nonneg

    @property
    def shape(self) -> torch.Size:
        """Shape of the full tensor this value stands for."""
        return torch.Size((self.data.shape[0], self.channels, *self.data.shape[2:]))

    def indices(self) -> Tensor:
        """Channel indices of the stored channels (an ``arange`` when all are stored)."""
        if self.idx is None:
            return torch.arange(self.channels, device=self.data.device)
        return self.idx

    def dense(self) -> Tensor:
        """The full tensor, zeros in the channels not stored."""
        if self.idx is None:
            return self.data
        out = self.data.new_zeros(self.shape)
        out.index_copy_(1, self.idx, self.data)
        return out

    def with_data(self, data: Tensor, nonneg: bool | None = None) -> Compact:
        """Same channels, new values (from a channel-wise op)."""
        return Compact(data, self.idx, self.channels, self.nonneg if nonneg is None else nonneg)

    def __repr__(self) -> str:
        return f"Compact({self.data.shape[1]}/{self.channels} channels, shape={tuple(self.shape)})"


def widen(value: object) -> object:
    """A :class:`Compact` as its full tensor; nested tuples, lists and dicts are walked; anything else as is."""
    if isinstance(value, Compact):
        return value.dense()
    if isinstance(value, (tuple, list)):
        return type(value)(widen(v) for v in value)
    if isinstance(value, dict):
        return {k: widen(v) for k, v in value.items()}
    return value


def live_channels(value: Compact) -> Compact:
    """Drop the stored channels that are all zero in every sample.

    A convolution then reads exactly the input channels that are non-zero, which is what
    :class:`ftwt.flops.FlopsMeter` counts as its active inputs (a ReLU can silence a kept
    filter for a sample).
    """
    data = value.data
    if data.shape[1] == 0 or data.dim() < 3:
        return value
    dims = (0, *range(2, data.dim()))
    # One max-reduction is much faster than ne(0).any() on CPU; NaN compares != 0, so it stays.
    live = data.amax(dims) != 0
    if not value.nonneg:
        live |= data.amin(dims) != 0
    if bool(live.all()):
        return value
    keep = live.nonzero().squeeze(1)
    idx = keep if value.idx is None else value.idx.index_select(0, keep)
    return Compact(data.index_select(1, keep), idx, value.channels, value.nonneg)


def add(a: Compact, b: Compact, native: bool = False) -> Compact:
    """``a + b`` of two compact values of the same shape: the result stores the union of their channels.

    ``native``: merge two partial values in one call of the native ``ftwt::union_add`` (float32 CPU).
    """
    if a.idx is not None and b.idx is not None and native and a.data.dtype == b.data.dtype == torch.float32:
        data, union = _native.union_add(a.data, a.idx, b.data, b.idx)
        return Compact(data, union, a.channels)
    if a.idx is b.idx or (a.idx is not None and b.idx is not None and torch.equal(a.idx, b.idx)):
        return Compact(a.data + b.data, a.idx, a.channels)
    if a.idx is None or b.idx is None:
        full, part = (a, b) if a.idx is None else (b, a)
        out = full.data.clone()
        out.index_add_(1, part.idx, part.data)
        return Compact(out, None, a.channels)
    mark = torch.zeros(a.channels, dtype=torch.bool, device=a.data.device)
    mark.index_fill_(0, a.idx, True).index_fill_(0, b.idx, True)
    union = mark.nonzero().squeeze(1)
    pos = torch.cumsum(mark, 0) - 1
    out = a.data.new_zeros((a.data.shape[0], union.numel(), *a.data.shape[2:]))
    # Summed in the same order as the model (0 + a, then + b), so values agree bit for bit.
    out.index_add_(1, pos.index_select(0, a.idx), a.data)
    out.index_add_(1, pos.index_select(0, b.idx), b.data)
    return Compact(out, union, a.channels)


def pad_channels(value: Compact, before: int, after: int) -> Compact:
    """Zero channels added on both sides (the option-A shortcut): only the indices move."""
    idx = value.indices() + before if before else value.idx
    if idx is None and after:
        idx = value.indices()
    return Compact(value.data, idx, value.channels + before + after, value.nonneg)


def cat_channels(values: Sequence[Compact]) -> Compact:
    """Concatenation along the channel dimension, still compact."""
    datas, idxs, offset = [], [], 0
    for v in values:
        datas.append(v.data)
        idxs.append(v.indices() + offset)
        offset += v.channels
    idx = torch.cat(idxs)
    all_stored = idx.numel() == offset
    return Compact(
        torch.cat(datas, 1), None if all_stored else idx, offset, all(v.nonneg for v in values)
    )
