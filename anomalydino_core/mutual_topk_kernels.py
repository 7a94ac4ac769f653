"""Block kernels of the streaming top-k (``mutual_topk``): tile screening and the tail buffer.

A tile holds v = cos - 1 - SHIFT = -(d + SHIFT) < 0 for (query x bank) pairs (or -inf for pairs
left out), in fp32 or bf16. Per query row, a ``TailBuffer`` of 2k values keeps the k largest v
(k smallest d) seen so far; its k-th largest is the row's threshold, and a tile only contributes
the values strictly above it (values equal to it cannot change the top-k multiset). The buffer is
compacted with ``torch.topk`` when full. Before a row has k values, a provisional threshold from
the tile itself is used: the k-th largest of its group maxima (k distinct entries, so a valid
lower bound).

Screening: negative floats read as integers are ordered in reverse, so "v > t" becomes
"key(v) < key(t)"; one vectorised integer min over strided column groups (several times faster
than a float max on CPU) finds the few groups holding candidates, whose members are gathered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ALIGN = 64  # block sizes are multiples of this (largest screening group size)
SHIFT = 2.0**-6  # v = cos - 1 - SHIFT < 0 strictly, also after bf16 rounding of the inputs
CAP_FACTOR = 2.0  # tail buffer width, in units of k
_LOW = -4.0  # below every possible v (>= -2 - SHIFT); thresholds are clamped to it
_SKIP = -0.0  # a threshold no (negative) value passes


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype whose bit patterns are the keys of tile values of ``dtype``."""
    return torch.int16 if dtype == torch.bfloat16 else torch.int32


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))


class TailBuffer:
    """Per query row, a buffer of 2k + 1 keys keeping the k largest v = -(d + shift) so far.

    Values are kept as the integer keys of the tile dtype (see ``_screen``: a smaller key is a
    larger value), so bf16 buffers take 2 bytes per value and need no conversion.
    """

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.cap = int(CAP_FACTOR * k) + 1
        self.dtype = dtype
        keys_dtype = key_dtype(dtype)
        #: the key of -inf: the largest (worst) key, marks empty slots and missing thresholds
        self.empty = int(torch.tensor(-math.inf, dtype=dtype).view(keys_dtype))
        self.keys = torch.full((rows, self.cap), self.empty, dtype=keys_dtype, device=device)
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)
        #: key of a lower bound of each row's final k-th largest v; ``empty`` until k values
        self.thr = torch.full((rows,), self.empty, dtype=keys_dtype, device=device)

    def insert(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Add candidate ``keys`` of buffer ``rows`` (ascending)."""
        if rows.numel() == 0:
            return
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(
            starts, counts
        )
        base = self.count.index_select(0, uniq)
        # append where there is room; rows without a threshold yet are compacted to get one
        fits = (base + counts <= self.cap) & (self.thr.index_select(0, uniq) != self.empty)
        slot = rows * self.cap + torch.repeat_interleave(base, counts) + rank
        if bool(fits.all()):
            self.keys.view(-1).index_copy_(0, slot, keys)
            self.count.index_add_(0, uniq, counts)
            return
        fits_each = torch.repeat_interleave(fits, counts)
        if bool(fits.any()):
            self.keys.view(-1).index_copy_(0, slot[fits_each], keys[fits_each])
            self.count.index_add_(0, uniq[fits], counts[fits])
        over = ~fits
        self._compact(uniq[over], counts[over], keys[~fits_each], rank[~fits_each])

    def _compact(
        self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, rank: torch.Tensor
    ) -> None:
        """Replace the buffers of ``rows`` by the k best of buffer + candidates."""
        device = rows.device
        row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=device), counts)
        bucket = torch.ceil(torch.log2(counts.to(torch.float64))).to(torch.int64)
        for b in torch.unique(bucket).tolist():
            sel = bucket == b  # rows whose candidate count is in (2^(b-1), 2^b]
            sel_idx = torch.nonzero(sel).squeeze(1)
            local = torch.full_like(sel, -1, dtype=torch.int64)
            local[sel_idx] = torch.arange(sel_idx.numel(), device=device)
            pick = torch.nonzero(sel[row_of]).squeeze(1)
            width = 1 << b
            pad = torch.full((sel_idx.numel(), width), self.empty, dtype=keys.dtype, device=device)
            slot = local[row_of[pick]] * width + rank[pick]
            pad.view(-1).index_copy_(0, slot, keys[pick])
            r = rows[sel_idx]
            merged = torch.cat([self.keys.index_select(0, r), pad], dim=1)
            top = torch.topk(merged, self.k, dim=1, largest=False, sorted=False).values
            merged[:, : self.k] = top
            merged[:, self.k : self.cap] = self.empty
            self.keys.index_copy_(0, r, merged[:, : self.cap])
            self.count.index_fill_(0, r, self.k)
            self.thr.index_copy_(0, r, top.amax(dim=1))

    def smallest_distances(self, start: int, stop: int) -> np.ndarray:
        """The k smallest distances of rows ``start .. stop``, ascending (float64)."""
        top = torch.topk(self.keys[start:stop], self.k, dim=1, largest=False, sorted=True)
        v = top.values.view(self.dtype).float().cpu().numpy().astype(np.float64)
        return -v - SHIFT


def _group_keys(keys: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """Min key over ``group`` strided bank positions along tile ``axis``; the queries stay on
    the other axis: (queries, groups) for axis 1, (groups, queries) for axis 0.

    Bank position p is in group p mod (length / group): the reduction runs over a middle or
    outer dimension, contiguous in memory, which vectorises well.
    """
    if group == 1:
        return keys
    if axis == 1:
        n_q, length = keys.shape
        return keys.view(n_q, group, length // group).amin(dim=1)
    length, n_q = keys.shape
    return keys.view(group, length // group, n_q).amin(dim=0)


def _screen(
    keys: torch.Tensor, axis: int, group: int, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys) of the tile entries with key < the query's ``limit``, queries ascending.

    Tile values are negative (or -inf), so their bit patterns read as integers order them in
    reverse: "v > t" is "key(v) < key(t)", and integer min-reductions are several times faster
    than float max-reductions on CPU. One pass takes the min key per group of bank positions; only
    the members of passing groups are gathered and compared.
    """
    width = keys.shape[1]
    gk = _group_keys(keys, axis, group)
    # queries along columns: transpose the (small) mask to get the hits grouped by query
    hit_mask = gk < limit[:, None] if axis == 1 else (gk < limit[None, :]).t().contiguous()
    g_len = hit_mask.shape[1]
    hit = torch.nonzero(hit_mask.view(-1)).squeeze(1)
    if hit.numel() == 0:
        return hit, keys.new_empty(0)
    q = torch.div(hit, g_len, rounding_mode="floor")
    if axis == 1:  # member j of group (q, p): tile[q, p + j * g_len]
        base = hit + q * (width - g_len)
        step = g_len
    else:  # member j of group (q, p): tile[p + j * g_len, q]
        base = (hit - q * g_len) * width + q
        step = g_len * width
    flat = base[:, None] + torch.arange(0, group * step, step, device=keys.device)
    cand = torch.take(keys, flat)  # (hits, group)
    p = torch.nonzero((cand < limit.index_select(0, q)[:, None]).view(-1)).squeeze(1)
    return q.index_select(0, torch.div(p, group, rounding_mode="floor")), cand.view(-1)[p]


def _provisional(keys: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Per query, a limit passing (at least) the entries >= its k-th largest tile value.

    The k largest group maxima are k distinct entries, so their minimum is a valid lower bound;
    small groups (about 4k of them or more) keep it tight. At least -4 (all finite values).
    """
    length, n_q = keys.shape[axis], keys.shape[1 - axis]
    low = torch.tensor(_LOW, dtype=_dtype_of_keys(keys)).view(keys.dtype)
    group = min(ALIGN, _pow2_floor(length / (4 * k)))
    while group > 1 and length // group < k:
        group //= 2
    if length // group < k:
        return torch.full((n_q,), int(low) + 1, dtype=keys.dtype, device=keys.device)
    gk = _group_keys(keys, axis, group)
    dim = 1 if axis == 1 else 0
    kth = torch.topk(gk, k, dim=dim, largest=False, sorted=False).values.amax(dim=dim)
    return torch.minimum(kth, low.to(keys.device)) + 1  # -inf (too few values) -> -4; "<="


def _dtype_of_keys(keys: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if keys.dtype == torch.int16 else torch.float32


def _group_size(length: int, candidates: float) -> int:
    """Screening group size balancing the scan of group minima against the gather of members.

    Per query: about length / group group minima to compare and collect (~2 ns each) against
    candidates * group members to gather (~5 ns each, random access).
    """
    group = min(ALIGN, _pow2_floor(math.sqrt(0.4 * length / max(candidates, 1.0))))
    while length % group:
        group //= 2
    return group


def update(
    buffer: TailBuffer,
    keys: torch.Tensor,
    axis: int,
    first: int,
    valid: int,
    seen: int,
) -> None:
    """Merge one tile into buffer rows ``first .. first + valid`` (bank positions along ``axis``).

    ``keys``: the tile viewed as ``key_dtype``, both sides multiples of ``ALIGN``, padding -inf.
    ``seen``: bank entries these queries have already been compared with (for the group size).
    """
    length, n_q = keys.shape[axis], keys.shape[1 - axis]
    k = buffer.k
    thr = buffer.thr[first : first + valid]
    fresh = thr == buffer.empty  # no k values yet: a threshold from this tile
    n_fresh = int(fresh.sum())
    skip = torch.tensor(_SKIP, dtype=buffer.dtype).view(keys.dtype).to(keys.device)
    if n_fresh:
        t0 = _provisional(keys, axis, k)
        if n_fresh < valid:
            t0[:valid] = torch.where(fresh, t0[:valid], skip)
        t0[valid:] = skip
        q, cand = _screen(keys, axis, _group_size(length, 1.2 * k), t0)
        buffer.insert(q + first, cand)
    if n_fresh < valid:
        # strictly above the k-th largest: values equal to it cannot change the top-k multiset
        t = torch.where(fresh, skip, thr) if n_fresh else thr
        t = torch.cat([t, skip.expand(n_q - valid)]) if n_q > valid else t
        group = _group_size(length, 1.5 * k * length / max(seen, length))
        q, cand = _screen(keys, axis, group, t)
        buffer.insert(q + first, cand)
