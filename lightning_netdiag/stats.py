"""The statistics: pure torch, no Lightning.

Every measurement is an *additive record*: a float64 vector of counts and sums that can be added across
micro-batches, ranks and shards and divided once, at the end. Its layout is

    [count of finite values, sum, sum of squares, count of non-finite values, <extra counts>, *histogram]

where the histogram counts the values over fixed edges (:class:`Bins`), with one open bin below the first
edge and one above the last; non-finite values are counted as 0 there and taken out when the record is
read, so that only finite values are ever shown.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_THRESHOLD", "HALF_EXTRA", "MOMENTS", "SMALL", "Bins", "Histogram", "Moments", "finite_mask",
    "half_counts", "host_reads_free", "launch_bound", "linear_bins", "log2_bins", "ratio_log10", "record_size",
    "recorded", "saturation_extra", "tensor_record", "tensor_records", "with_extra", "zero_bin",
]  # fmt: skip

#: Slots every record starts with: finite count, sum, sum of squares, non-finite count.
MOMENTS = 4
COUNT, SUM, SUMSQ, NONFINITE = range(MOMENTS)

#: The lecture's tanh saturation threshold: |tanh| > 0.97.
DEFAULT_THRESHOLD = 0.97


#: Values reduced per pass on the CPU: bounds a record's temporaries to about 16 bytes per value of one chunk
#: (4 MB). Measured on a 2-core VM (interleaved medians): a 1024 x 1024 gradient's record 3.8 -> 2.5 ms against
#: chunks of 1M values, a 512 x 1024 activation's 1.2 -> 1.65 ms.
_CHUNK = 1 << 18
#: The same on a GPU, where each of a chunk's ~20 kernels costs its launch on the host whatever its size: with
#: 2**18, GPT-2 124M's logging step (bf16, batch 8 x 1024, an H200) reduced ~3,800 chunks in 1.6 s, 26 steps' time.
_GPU_CHUNK = 1 << 22
#: The integer type of a float's bits, and the bits of its mantissa: shifted away, sign and exponent remain.
_FLOAT_BITS = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}


class Bins:
    """Fixed histogram edges for which each value's bin is found exactly in one elementwise pass.

    ``linear``: edges ``k * 2**exp`` for ``k = lo .. hi``; bin ``i`` holds ``edges[i-1] <= x < edges[i]``,
    found as ``floor(x * 2**-exp)`` (exact: a power-of-two scale does not round).
    ``log2``: edges ``-2**hi .. -2**lo, 2**lo .. 2**hi``; a value goes to the bin of its magnitude on its
    side of zero (``2**k <= |x| < 2**(k+1)``), read from the exponent bits of the float, and the middle bin
    holds ``|x| < 2**lo``. A binary search over the edges (``bucketize``) costs about 30 times as much.
    Either way one open bin lies below the first edge and one above the last.
    """

    def __init__(self, kind: str, lo: int, hi: int, exp: int = 0, device: torch.device | None = None) -> None:
        if kind not in ("linear", "log2") or not lo < hi:
            raise ValueError(f"Expected `kind` 'linear' or 'log2' and lo < hi, got {kind!r}, {lo}, {hi}")
        self.kind, self.lo, self.hi, self.exp = kind, lo, hi, exp
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if kind == "linear":
            self.edges = tuple(math.ldexp(k, exp) for k in range(lo, hi + 1))
            self._fold: dict[torch.dtype, Tensor] = {}
        else:
            magnitudes = [math.ldexp(1.0, k) for k in range(lo, hi + 1)]
            self.edges = (*(-m for m in reversed(magnitudes)), *magnitudes)
            self._fold = {dtype: self._fold_map(dtype, self.device) for dtype in (torch.float32, torch.float64)}
        self.size = len(self.edges) + 1

    def to(self, device: torch.device) -> Bins:
        """These bins with their lookup tensors on ``device`` (``self`` if they are there already)."""
        if torch.device(device) == self.device:
            return self
        return Bins(self.kind, self.lo, self.hi, self.exp, device)

    def _fold_map(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """For each sign-and-exponent field of a ``dtype`` float (as a non-negative key), its bin."""
        bits, mantissa = _FLOAT_BITS[dtype]
        n_exp = 1 << (torch.iinfo(bits).bits - 1 - mantissa)  # exponent fields: 256 for float32
        bias = n_exp // 2 - 1
        n_pos = self.hi - self.lo + 1
        key = torch.arange(2 * n_exp, device=device)  # the shifted bits + n_exp: negative values first
        c = (key % n_exp - bias - self.lo + 1).clamp(0, n_pos)  # 0: below 2**lo; n_pos: at or above 2**hi
        return torch.where(key < n_exp, n_pos - c, n_pos + c)

    def counts(self, x: Tensor, segments: Tensor | None = None, n: int = 1) -> Tensor:
        """Float64 counts of the finite float32 or float64 values ``x``, on ``x``'s device.

        With ``segments`` (for each value, which of ``n`` segments it belongs to), one row of counts per
        segment, ``(n, size)``, from one count over keys offset by segment.
        """
        x = x.reshape(-1)
        if self.kind == "linear":
            index = (x * math.ldexp(1.0, -self.exp)).floor_().clamp_(self.lo - 1, self.hi).sub_(self.lo - 1)
            index, space = index.to(torch.int32), self.size  # bincount takes int32 too: half the bytes
        else:
            bits, mantissa = _FLOAT_BITS[x.dtype]
            fold = self._fold[x.dtype]
            space = fold.numel()
            index = (x.view(bits) >> mantissa) + space // 2  # sign and exponent, shifted to 0 .. 2 * n_exp
        if segments is not None:
            index = index + segments * space
        counted = _count(index, n * space).view(n, space)
        if self.kind == "log2":
            counted = torch.zeros(n, self.size, dtype=torch.float64, device=x.device).index_add_(1, fold, counted)
        return counted if segments is not None else counted[0]


#: The most keys :func:`_count` counts with ``histc``: its float32 keys stay exact, and so does its bin.
_HISTC_KEYS = 1 << 22


def _count(index: Tensor, size: int) -> Tensor:
    """How many times each of ``0 .. size-1`` occurs in ``index``, as float64.

    ``bincount`` on a CPU, where it is twice as fast as the rest; on CUDA, where ``bincount`` synchronises (it
    reads the maximum), ``histc`` (:func:`_histc_count`); ``index_add_`` of ones elsewhere, under torch.compile
    (where bincount's output size breaks the graph), and where deterministic algorithms are asked for (histc has
    none on CUDA).
    """
    compiling = torch.compiler.is_compiling()
    if index.device.type == "cpu" and not compiling:
        return torch.bincount(index, minlength=size).to(torch.float64)
    cuda = index.device.type == "cuda" and not compiling and not torch.are_deterministic_algorithms_enabled()
    return _histc_count(index, size) if cuda and size <= _HISTC_KEYS else _index_add_count(index, size)


def _index_add_count(index: Tensor, size: int) -> Tensor:
    """:func:`_count` by ``index_add_`` of ones: on any device, and in a compiled graph."""
    ones = torch.ones((), dtype=torch.float64, device=index.device).expand(index.numel())
    return torch.zeros(size, dtype=torch.float64, device=index.device).index_add_(0, index, ones)


def _histc_count(index: Tensor, size: int) -> Tensor:
    """:func:`_count` by ``histc``, which on CUDA counts in each block's shared memory, where ``index_add_`` of ones
    adds to the few bins most values fall in, one global atomic after another (an H200 made records of 25M values at
    2.2e9 values a second, whatever the chunk: a small fraction of its bandwidth, most likely for that).

    Each key is put at the centre of its bin, so that either way of rounding ``(k + 0.5) * size / size`` gives ``k``
    (``size`` at most :data:`_HISTC_KEYS`); the float32 counts are exact up to 2**24 a bin, more than a chunk holds.
    """
    return torch.histc(index + 0.5, bins=size, min=0, max=size).to(torch.float64)


def linear_bins(low: float, high: float) -> Bins:
    """48 to 96 evenly spaced bins covering ``[low, high]`` for a bounded activation (tanh: 64 on [-1, 1]).

    The width is a power of two, so that binning is exact.
    """
    exp = math.floor(math.log2((high - low) / 48))
    return Bins("linear", math.floor(math.ldexp(low, -exp)), math.ceil(math.ldexp(high, -exp)), exp)


def log2_bins(lo: int = -30, hi: int = 10) -> Bins:
    """Signed power-of-two edges ``±2**lo .. ±2**hi`` (about 1e-9 .. 1e3), one bin per octave.

    Gradients span many decades (1e-6 .. 1e-1 is common), so no linear range fits them all; these bins
    resolve every scale with a constant relative width, and the middle bin holds exact zeros.
    """
    return Bins("log2", lo, hi)


def record_size(bins: Bins | None, extra: int = 0) -> int:
    """Length of a record with ``extra`` counts after the moments and a histogram over ``bins``."""
    return MOMENTS + extra + (0 if bins is None else bins.size)


def launch_bound(device: torch.device) -> bool:
    """Whether a pass over a chunk of values costs its kernels' launches more than their work on ``device``: on
    an accelerator (each launch costs the host the same whatever the size), not on a CPU (where a call is its
    work). It sets the chunks' size: :data:`_CHUNK` or :data:`_GPU_CHUNK` here, the attention's blocks of scores
    (:func:`lightning_netdiag.attention.block_size`)."""
    return device.type != "cpu"


def host_reads_free(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host costs nothing: a CPU tensor outside a compiled graph.

    There a record first assumes every value is finite and checks that once on the host (a NaN or an
    Inf makes the sum of squares non-finite), skipping the clean-up passes; on CUDA, where a read waits
    for the device, and in a graph, which a read would break, the clean-up always runs (no host read).
    """
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def finite_mask(x: Tensor, record: Tensor) -> Tensor | None:
    """Where ``x`` is finite; None where its ``record`` shows every value is (read only where free)."""
    if host_reads_free(x) and record[NONFINITE].item() == 0:
        return None
    return torch.isfinite(x)


def tensor_record(x: Tensor, bins: Bins | None, divisor: Tensor | float | None = None) -> Tensor:
    """The additive record of ``x`` (divided by ``divisor``): moments of its finite values, histogram
    counts (insert counts of your own with :func:`with_extra`).

    Runs on ``x``'s device, never synchronises with a GPU, and leaves ``x`` untouched; half and bf16 values are
    summed in float32, and they and the division are taken chunk by chunk, so no full-size temporary is made.
    """
    flat = x.detach().reshape(-1)
    size = _GPU_CHUNK if launch_bound(flat.device) else _CHUNK
    chunks = flat.split(size) if flat.numel() > size else (flat,)
    host = host_reads_free(flat)
    body = [_chunk_record(_summable(c, divisor), bins, host) for c in chunks]
    return body[0] if len(body) == 1 else torch.stack(body).sum(0)


def _summable(x: Tensor, divisor: Tensor | float | None) -> Tensor:
    """``x`` in float32 or float64 (half and bf16 are summed in float32), divided by ``divisor``."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return x if divisor is None else x / divisor


def with_extra(record: Tensor, extra: Sequence[Tensor]) -> Tensor:
    """``record`` with the ``extra`` counts inserted after its moments."""
    if not extra:
        return record
    extra_counts = torch.stack([e.to(torch.float64) for e in extra])
    return torch.cat([record[:MOMENTS], extra_counts, record[MOMENTS:]])


#: fp16's smallest normal value: below it, a value keeps fewer significant bits, and below 2**-24 it is 0.
FP16_TINY = 2.0**-14
#: Extra counts of an activation-gradient record: values computed in fp16, and those of them that are
#: non-zero and below :data:`FP16_TINY` (counted as computed, before any loss scale is divided out).
HALF_EXTRA = 2


def half_counts(x: Tensor) -> list[Tensor]:
    """``x``'s two :data:`HALF_EXTRA` counts: zeros unless ``x`` is fp16 (bf16 has float32's range)."""
    if x.dtype != torch.float16:
        return [x.new_zeros((), dtype=torch.float64)] * HALF_EXTRA
    tiny = (x != 0) & (x.abs() < FP16_TINY)
    return [x.new_full((), float(x.numel()), dtype=torch.float64), tiny.sum().to(torch.float64)]


#: Tensors of at most this many values are reduced together, in one pass over their concatenation: a
#: record costs about fifteen small kernels, whose launches, not their work, dominate for small tensors
#: (on a 2-core CPU, seven tensors of 4,096 values: 0.43 ms together, 0.93 one at a time; of 16,384 values
#: 0.89 and 1.13 ms; of 32,768, 5.4 and 1.4 ms).
SMALL = 1 << 14


def tensor_records(xs: Sequence[Tensor], bins: Bins | None, divisor: Tensor | float | None = None) -> list[Tensor]:
    """The record of each tensor (divided by ``divisor``), as :func:`tensor_record` gives it; the small
    ones of each device in one pass. Sums are added in another order than one tensor's (float64 either
    way); counts are equal."""
    out: list[Tensor | None] = [None] * len(xs)
    small: dict[torch.device, list[int]] = {}
    for i, x in enumerate(xs):
        if x.numel() <= SMALL:
            small.setdefault(x.device, []).append(i)
        else:
            out[i] = tensor_record(x, bins, divisor=divisor)
    for members in small.values():
        flat = [xs[i].detach().reshape(-1) for i in members]
        dtype = torch.float64 if any(f.dtype == torch.float64 for f in flat) else torch.float32
        x = torch.cat([f.to(dtype) for f in flat])  # half and bf16 are summed in float32 or more
        if divisor is not None:
            x = x / divisor
        sizes = tuple(f.numel() for f in flat)
        rows = _finite_records(x, sizes, bins) if host_reads_free(x) else None
        if rows is None:
            rows = _clean_records(x, sizes, bins)
        for i, row in zip(members, rows, strict=True):
            out[i] = row
    return out  # type: ignore[return-value]


def _chunk_record(x: Tensor, bins: Bins | None, host: bool) -> Tensor:
    record = _finite_records(x, (x.numel(),), bins) if host else None
    return (_clean_records(x, (x.numel(),), bins) if record is None else record)[0]


def _finite_records(x: Tensor, sizes: tuple[int, ...], bins: Bins | None) -> Tensor | None:
    """The records of the segments of ``sizes`` of ``x``, if every value is finite (checked on the host,
    once); None otherwise. Squares of float32 values are exact in float64."""
    xd = x.to(torch.float64)
    sums = _segment_sums([xd, xd * xd], sizes).tolist()
    if not all(math.isfinite(squares) for _, squares in sums):  # a NaN or an Inf makes it non-finite
        return None
    head = torch.tensor([[n, s, ss, 0.0] for n, (s, ss) in zip(sizes, sums, strict=True)], dtype=torch.float64)
    return head if bins is None else torch.cat([head, _histograms(x, sizes, bins)], dim=1)


def _clean_records(x: Tensor, sizes: tuple[int, ...], bins: Bins | None) -> Tensor:
    """The records of the segments of ``sizes`` of ``x``, with no host read. Non-finite values become 0
    and are counted; they are left out of every other statistic, and the histogram's zero bin gives them
    back when it is read (Histogram.of)."""
    xz = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    bad = (x * 0).ne(0).to(torch.float64)  # x * 0 is NaN exactly where x is not finite
    xd = xz.to(torch.float64)
    head = _segment_sums([1.0 - bad, xd, xd * xd, bad], sizes)
    return head if bins is None else torch.cat([head, _histograms(xz, sizes, bins)], dim=1)


def _segment_sums(columns: Sequence[Tensor], sizes: tuple[int, ...]) -> Tensor:
    """Per segment of ``sizes`` of the values, the sum of each of ``columns``: ``(segments, columns)``.

    Vectorised pairwise sums of contiguous views; not ``dot`` (BLAS accumulates in one running sum: the
    variance of a weight near 1 lost five digits to it) nor ``index_add_`` (one value at a time, ~25x slower).
    """
    if len(sizes) == 1:
        return torch.stack([c.sum() for c in columns]).unsqueeze(0)
    return torch.stack([part.sum(1) for part in torch.stack(list(columns)).split(sizes, dim=1)])


def _histograms(x: Tensor, sizes: tuple[int, ...], bins: Bins) -> Tensor:
    if len(sizes) == 1:
        return bins.counts(x).unsqueeze(0)
    return bins.counts(x, _segments(sizes, x.device), len(sizes))


_SEGMENTS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _segments(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """For each value of a concatenation of tensors of ``sizes``, the index of its tensor. Built once per
    layout (the parameters' sizes do not change), so that no step copies sizes to the device."""
    key = (sizes, device)
    if key not in _SEGMENTS:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        counts = torch.tensor(sizes, dtype=torch.int64)
        _SEGMENTS[key] = torch.repeat_interleave(torch.arange(len(sizes)), counts).to(device)
    return _SEGMENTS[key]


def zero_bin(edges: Sequence[float]) -> int:
    """The bin that holds 0 (bin ``i`` holds ``edges[i-1] <= x < edges[i]``)."""
    return bisect.bisect_right(edges, 0.0)  # also for log2 bins, whose middle bin holds |x| < 2**lo


def recorded(record: Sequence[float]) -> bool:
    """Whether a record counted any value (a layer that did not run, a rank without the tensor: no)."""
    return record[COUNT] + record[NONFINITE] > 0


@dataclass(frozen=True)
class Moments:
    """Mean and standard deviation of a record, divided once. ``std`` is unbiased, as ``torch.std``."""

    count: float
    mean: float
    std: float
    nonfinite: float

    @classmethod
    def of(cls, record: Sequence[float]) -> Moments:
        n, s, ss, bad = (record[i] for i in (COUNT, SUM, SUMSQ, NONFINITE))
        mean = s / n if n > 0 else math.nan
        var = (ss - s * mean) / (n - 1) if n > 1 else math.nan
        return cls(count=n, mean=mean, std=math.sqrt(max(var, 0.0)), nonfinite=bad)


@dataclass(frozen=True)
class Histogram:
    """Counts over fixed ``edges``, with an open bin below the first edge and one above the last."""

    edges: tuple[float, ...]
    counts: tuple[float, ...]

    @classmethod
    def of(cls, record: Sequence[float], edges: Sequence[float], extra: int = 0) -> Histogram:
        """The histogram stored at the end of a record with ``extra`` counts after the moments."""
        start = MOMENTS + extra
        counts = list(record[start : start + len(edges) + 1])
        counts[zero_bin(edges)] -= record[NONFINITE]  # the non-finite values, counted there as 0
        return cls(tuple(edges), tuple(counts))

    @property
    def bounds(self) -> list[float]:
        """Bin ``i`` spans ``bounds[i] .. bounds[i+1]``; each open bin is drawn as wide as its neighbour."""
        e = self.edges
        return [2 * e[0] - e[1], *e, 2 * e[-1] - e[-2]]

    @property
    def uniform(self) -> bool:
        """Evenly spaced edges (a bounded activation); otherwise log-spaced (gradients, unbounded ones)."""
        widths = [b - a for a, b in itertools.pairwise(self.edges)]
        return max(widths) <= 1.001 * min(widths)

    @property
    def total(self) -> float:
        return sum(self.counts)

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Quantiles, linear within a bin."""
        total, bounds, out = self.total, self.bounds, []
        if total <= 0:
            return [math.nan] * len(qs)
        for q in qs:
            target, seen = q * total, 0.0
            for i, c in enumerate(self.counts):
                if c > 0 and seen + c >= target:
                    out.append(bounds[i] + (bounds[i + 1] - bounds[i]) * (target - seen) / c)
                    break
                seen += c
        return out


def ratio_log10(numerator: float, denominator: float) -> float:
    """log10(numerator / denominator), NaN (never -inf or inf) where the ratio is zero or undefined."""
    if not (numerator > 0 and denominator > 0) or not math.isfinite(numerator / denominator):
        return math.nan
    return math.log10(numerator / denominator)


def saturation_extra(mask: Tensor, finite: Tensor | None, unit_dim: int) -> tuple[Tensor, Tensor]:
    """Saturated count, and per unit the number of examples in which it is *not* saturated; ``finite``
    masks the values counted (None: all are).

    A unit (a feature along ``unit_dim``) whose count stays 0 over the whole logging step is dead: saturated
    for every example, a white column of the lecture's ``imshow(h.abs() > 0.99)``.
    """
    saturated = mask if finite is None else mask & finite
    alive = ~saturated if finite is None else ~saturated & finite
    alive = alive.movedim(unit_dim, -1) if mask.dim() > 0 else alive.reshape(1)
    # count_nonzero: summing booleans into float64 converts value by value, about 5x slower.
    per_unit = torch.count_nonzero(alive.reshape(-1, alive.shape[-1]), dim=0).to(torch.float64)
    return torch.count_nonzero(saturated).to(torch.float64), per_unit
