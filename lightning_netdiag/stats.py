"""The statistics: pure torch, no Lightning.

Every measurement is an *additive record*: a float64 vector of counts and sums that can be added across
micro-batches, ranks and shards and divided once, at the end. Its layout is

    [count of finite values, sum, sum of squares, count of non-finite values, <extra counts>, *histogram]

where the histogram counts the finite values over fixed edges (:class:`Bins`), with one open bin below the
first edge and one above the last. The histogram of a tensor of more than :data:`HIST_SAMPLE` values counts a
fixed sample of about that many of them, scaled to the tensor's size (:func:`sample_stride`); the moments and
every count before the histogram are always of every value.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

__all__ = [
    "DEFAULT_THRESHOLD", "HALF_EXTRA", "HIST_SAMPLE", "MOMENTS", "SAMPLE_BLOCK", "SMALL", "Bins", "Histogram",
    "Moments", "add_record", "as_gpu", "count_true", "finite_mask", "group_limits", "half_counts", "host_reads_free",
    "launch_bound", "linear_bins", "log2_bins", "ratio_log10", "record_size", "recorded", "row_squares",
    "sample_stride", "saturation_extra", "size_groups", "sparse_values", "sum_and_squares", "tensor_record",
    "tensor_records", "where_finite",
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
#: The same on a GPU, where each of a chunk's ~10 kernels costs its launch on the host whatever its size: with
#: 2**18, GPT-2 124M's logging step (bf16, batch 8 x 1024, an H200) reduced ~3,800 chunks in 1.6 s, 26 steps' time.
#: A chunk's temporaries there are its values in float64 with the non-finite ones zeroed, and float64 ones where they
#: are finite (:func:`_device_moments`): 128 MB.
_GPU_CHUNK = 1 << 23
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
        else:
            magnitudes = [math.ldexp(1.0, k) for k in range(lo, hi + 1)]
            self.edges = (*(-m for m in reversed(magnitudes)), *magnitudes)
        self.size = len(self.edges) + 1
        self._fold: dict[torch.dtype, Tensor] = {}
        if kind == "log2":
            self._fold = {dtype: self._fold_map(dtype, self.device) for dtype in (torch.float32, torch.float64)}

    def __eq__(self, other: object) -> bool:
        """The same edges on the same device: records over them can be taken together."""
        return isinstance(other, Bins) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def _key(self) -> tuple:
        return (self.kind, self.lo, self.hi, self.exp, self.device)

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
        bins = torch.where(key < n_exp, n_pos - c, n_pos + c)
        return bins.masked_fill_(key % n_exp == n_exp - 1, self.size)  # inf and NaN: to a bin that is dropped

    def counts(
        self, x: Tensor, finite: bool = False, scratch: bool = False, owners: tuple[Tensor, int] | None = None
    ) -> Tensor:
        """Float64 counts of the finite values of the float32 or float64 ``x``, of any shape or strides (``finite``:
        all are), on ``x``'s device; values that are not finite are counted in no bin. ``scratch``: ``x`` is a
        temporary of the caller's that log2 bins may overwrite with its keys (no full-size allocation).

        With ``owners = (index, n)`` (``x`` is ``(k, m)``, its row ``j`` of tensor ``index[j]`` of ``n``, ``index``
        int32), one row of counts per tensor, ``(n, size)``, from one count over keys offset by tensor.
        """
        rows = x.shape[0] if owners is not None else 0
        if self.kind == "linear":
            index = (x * math.ldexp(1.0, -self.exp)).floor_().clamp_(self.lo - 1, self.hi)
            if not finite:  # the values that are not finite go to a key that is dropped
                index = torch.where(where_finite(x), index, self.hi + 1)
            index, space, base = index.to(torch.int32), self.size + 1, 1 - self.lo  # int32: half the bytes
        else:
            bits, mantissa = _FLOAT_BITS[x.dtype]
            fold = self._fold[x.dtype]
            space = fold.numel()
            keys = x.view(bits)  # sign and exponent, shifted by base to 0 .. space
            index, base = keys.bitwise_right_shift_(mantissa) if scratch else keys >> mantissa, space // 2
        index = index.reshape(-1)  # keys made from a strided x (a sample's blocks) are new: a view, no copy of x
        shape: tuple[int, ...] = (self.size + 1,)
        if owners is None:
            counted = _count(index.add_(base), space)
        else:  # in place: each row's keys offset by its tensor's index times space
            tensor, n = owners
            index.view(rows, -1).add_((tensor * space + base).to(index.dtype)[:, None])
            counted, shape = _count(index, n * space).view(n, space), (n, self.size + 1)
        if self.kind == "log2":  # folded before the counts become float64: 84 bins of each tensor, not 512 keys
            counted = counted.new_zeros(shape).index_add_(-1, fold, counted)
        return counted[..., : self.size].to(torch.float64)

    @functools.cached_property
    def zero_bin(self) -> int:
        """The bin of 0.0."""
        return int(Bins(self.kind, self.lo, self.hi, self.exp).counts(torch.zeros(1)).argmax())


#: The most keys :func:`_count` counts with ``histc``: its float32 keys stay exact, and so does its bin.
_HISTC_KEYS = 1 << 22


def _count(index: Tensor, size: int) -> Tensor:
    """How many times each of ``0 .. size-1`` occurs in ``index``: exact, as int64, float32 or float64.

    ``bincount`` on a CPU, where it is twice as fast as the rest; on CUDA, where ``bincount`` synchronises (it
    reads the maximum), ``histc`` (:func:`_histc_count`); ``index_add_`` of ones elsewhere, under torch.compile
    (where bincount's output size breaks the graph), and where deterministic algorithms are asked for (histc has
    none on CUDA).
    """
    compiling = torch.compiler.is_compiling()
    if index.device.type == "cpu" and not compiling:
        return torch.bincount(index, minlength=size)
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
    (``size`` at most :data:`_HISTC_KEYS`); the float32 counts are exact up to 2**24 a bin, more than a chunk, or
    a sample, or one small tensor holds.
    """
    return torch.histc(index + 0.5, bins=size, min=0, max=size)


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


_AS_GPU = [False]  # see as_gpu()


@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """Within it, CPU tensors take a GPU's paths (:func:`launch_bound`, :func:`host_reads_free`): no host read inside
    a record, a GPU's chunks and attention blocks, tensors reduced together. For the tests (``--gpu-path``) and the
    benchmarks (``--as-gpu``): a GPU's code run and checked where there is none."""
    before, _AS_GPU[0] = _AS_GPU[0], True
    try:
        yield
    finally:
        _AS_GPU[0] = before


def launch_bound(device: torch.device) -> bool:
    """Whether a pass over a chunk of values costs its kernels' launches more than their work on ``device``: on
    an accelerator (each launch costs the host the same whatever the size), not on a CPU (where a call is its
    work). It sets the chunks' size: :data:`_CHUNK` or :data:`_GPU_CHUNK` here, the attention's blocks of scores
    (:func:`lightning_netdiag.attention.block_size`)."""
    return device.type != "cpu" or _AS_GPU[0]


def host_reads_free(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host costs nothing: a CPU tensor outside a compiled graph.

    There a record first assumes every value is finite and checks that once on the host (a NaN or an
    Inf makes the sum of squares non-finite), skipping the clean-up passes; on CUDA, where a read waits
    for the device, and in a graph, which a read would break, the clean-up always runs (no host read).
    """
    return x.device.type == "cpu" and not _AS_GPU[0] and not torch.compiler.is_compiling()


def finite_mask(x: Tensor, record: Tensor) -> Tensor | None:
    """Where ``x`` is finite; None where its ``record`` shows every value is (read only where free)."""
    if host_reads_free(x) and record[NONFINITE].item() == 0:
        return None
    return where_finite(x)


def where_finite(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Where ``x`` is finite, in two kernels: ``x - x`` is 0 there and NaN elsewhere (``torch.isfinite`` launches
    four, each a pass over ``x``: ``x == x``, ``x.abs()``, ``!= inf`` and their product). With ``out`` (a float
    tensor of ``x``'s shape), as ones and zeros written into it, with no other temporary."""
    if out is None:
        return (x - x).eq(0)
    return torch.sub(x, x, out=out).eq_(0)


def count_true(mask: Tensor) -> Tensor:
    """How many of the bool ``mask`` are true, as a 0-dim tensor on its device: ``count_nonzero`` on a CPU (a kernel
    of its own), an int32 sum on an accelerator (:func:`launch_bound`), where ``count_nonzero`` is a sum and torch
    copies a bool mask whole to a sum's dtype before reducing it (int64 by default: 8 bytes a value)."""
    return mask.sum(dtype=torch.int32) if launch_bound(mask.device) else torch.count_nonzero(mask)


def tensor_record(x: Tensor, bins: Bins | None, divisor: Tensor | float | None = None) -> Tensor:
    """The additive record of ``x`` (divided by ``divisor``): moments of its finite values, histogram
    counts (add it to a record with counts of your own with :func:`add_record`).

    Runs on ``x``'s device, never synchronises with a GPU, and leaves ``x`` untouched. On the host (a CPU
    tensor outside a compiled graph) a tensor of more than :data:`SMALL` values costs about two reads of it
    (:func:`_fast_moments`) and its histogram a sample; elsewhere its moments are taken in float64 chunk by chunk
    (no host read, :func:`_device_moments`), so that no full-size temporary is made. Half and bf16 values are summed
    in float32 or more.
    """
    x = x.detach() if x.requires_grad else x
    flat = x.reshape(-1).contiguous()  # a strided 1-D view stays strided through reshape; rows and samples need one
    host = host_reads_free(flat)
    head = _fast_moments(flat) if host and flat.numel() > SMALL else None
    finite = head is not None  # known on the host: every value is
    if head is None:
        size = _GPU_CHUNK if launch_bound(flat.device) else _CHUNK
        chunks = flat.split(size) if flat.numel() > size else (flat,)
        heads = [_chunk_moments(c, host) for c in chunks]
        finite = all(known for _, known in heads)
        head = heads[0][0] if len(heads) == 1 else torch.stack([h for h, _ in heads]).sum(0)
    if divisor is not None:
        head = head * _moment_scale(divisor, head)
    if bins is None:
        return head
    return torch.cat([head, _sampled_counts(x, flat, bins, divisor, finite)])


def _summable(x: Tensor) -> Tensor:
    """``x`` in float32 or float64: half and bf16 are summed in float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _moment_scale(divisor: Tensor | float, head: Tensor) -> Tensor:
    """What divides the moments by ``divisor``: ``1, 1/d, 1/d**2, 1`` (without a host read of a tensor ``d``)."""
    if not isinstance(divisor, Tensor):
        return _float_scale(float(divisor), head.device)
    inverse = torch.as_tensor(divisor, dtype=torch.float64, device=head.device).reciprocal()
    one = torch.ones((), dtype=torch.float64, device=head.device)
    return torch.stack([one, inverse, inverse * inverse, one])


@functools.lru_cache(maxsize=16)
def _float_scale(divisor: float, device: torch.device) -> Tensor:
    return _on_device(torch.tensor([1.0, 1 / divisor, 1 / divisor**2, 1.0], dtype=torch.float64), device)


def _on_device(t: Tensor, device: torch.device) -> Tensor:
    """The host's ``t`` on ``device`` without waiting for it: on CUDA through pinned memory (a copy from the host's
    pageable memory waits for the stream: a synchronisation at the logging step that first makes it)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


#: Values of half or bf16 copied to float32 at a time by :func:`_fast_moments` (4 MB).
_FAST_CHUNK = 1 << 20
#: The most values :func:`_by_pieces` takes one norm of: a float32 norm adds each square to one running sum (16M
#: values of a weight: 1.5e-3 off). Measured on values of mean 1 and std 1: a 4096 x 4096 tensor's sum 1e-10 off in
#: pieces of 1,024 (3e-9 in pieces of 4,096, 3e-10 in pieces of 256 at 15 % more time), rows of 4,096 values 2e-7
#: (4e-7, 6e-8).
_ROW = 1 << 10
#: Below this, float32 squares would lose values to underflow (2**-126 and less): the sum is taken exactly.
_TINY_SQUARES = 2.0**-80


def _fast_moments(flat: Tensor) -> Tensor | None:
    """The moments of a CPU tensor from float32 sums (about two reads of a float32 tensor: no float64 copy), checked on
    the host in one read; or None where they would not do (then they are taken in float64 without a host read, as a
    GPU's are: :func:`_device_moments`): where a value is not finite, where squares overflow or underflow float32
    (values beyond 2**63 or all below 2**-40), or where a float64 tensor's mean dwarfs its spread.

    Where the mean dwarfs the spread (:func:`_cancels`: a sigmoid's output, a saturated tanh, a norm layer's gain) the
    sums are taken again about the mean, a chunk at a time in a float32 buffer (about two reads more), and turned back
    into sums of the values in float64. Half and bf16 values go through that buffer too (a CPU sum of bf16 into
    float32 copies the whole tensor first); float64 tensors are summed in float64 and left to the float64 path there.
    """
    n = flat.numel()
    if flat.dtype in (torch.float32, torch.float64):
        s, ss = sum_and_squares(flat).tolist()
    else:
        s, ss = _buffered_sums(flat, 0.0)
    # a value that is not finite, or finite values whose float32 squares overflow or underflow
    if not math.isfinite(s) or not math.isfinite(ss) or ss < _TINY_SQUARES:
        return None
    if _cancels(n, s, ss):
        if flat.dtype == torch.float64:
            return None
        shift = torch.tensor(s / n, dtype=torch.float32).item()  # the value a float32 subtraction takes away
        ds, dss = _buffered_sums(flat, shift)
        if not (math.isfinite(ds) and math.isfinite(dss)):
            return None
        s, ss = ds + n * shift, dss + shift * (2 * ds + n * shift)
    return torch.tensor([n, s, ss, 0.0], dtype=torch.float64)


def _cancels(n: Any, s: Any, ss: Any) -> Any:
    """Whether ``sum(x**2) - sum(x)**2 / n`` would lose the variance's digits: the mean above 1.7 spreads (the
    spread under half the root mean square)."""
    return s * s > 0.75 * n * ss


def _buffered_sums(flat: Tensor, shift: float) -> list[float]:
    """Sum and sum of squares of ``flat - shift``, its values copied to float32 a chunk at a time into one buffer."""
    buffer = torch.empty(min(flat.numel(), _FAST_CHUNK), dtype=torch.float32)
    parts = []
    for part in flat.split(_FAST_CHUNK):
        chunk = buffer[: part.numel()].copy_(part)
        parts.append(sum_and_squares(chunk.sub_(shift) if shift else chunk))
    return torch.stack(parts).sum(0).tolist()


def sum_and_squares(v: Tensor) -> Tensor:
    """``[sum, sum of squares]`` of the values ``v``, in float64, reading ``v`` twice with no full-size temporary where
    it is float32 or float64 (others, half precision or integers, are copied to float64 first): the sums and squared
    norms of its pieces (:func:`_by_pieces`) in ``v``'s precision, the pieces added in float64. Not
    ``v.sum(dtype=torch.float64)``: torch converts a reduction's whole input to its result's dtype first, a float64
    copy written and read again."""
    v = v.reshape(-1) if v.dtype in (torch.float32, torch.float64) else v.reshape(-1).double()
    body, rest = _by_pieces(v)
    parts = torch.stack([body.sum(-1), torch.linalg.vector_norm(body, dim=-1).square_()])
    if rest is not None:
        parts = torch.cat([parts, torch.stack([rest.sum(), torch.linalg.vector_norm(rest).square()])[:, None]], dim=1)
    return parts.double().sum(1)


def row_squares(rows: Tensor) -> Tensor:
    """The sum of the squares of each row of ``rows`` ``(k, n)`` in float64, as :func:`sum_and_squares` takes it."""
    body, rest = _by_pieces(rows)
    squares = torch.linalg.vector_norm(body, dim=-1).square_().double().sum(-1)
    if rest is not None:
        squares += torch.linalg.vector_norm(rest, dim=-1).square_().double()
    return squares


def _by_pieces(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``x`` ``(..., n)`` cut along its last dimension for float32 sums and norms, which add each value to one
    running sum: views of its pieces ``(..., pieces, piece)`` and of the rest ``(..., n - pieces * piece)``, None
    where the pieces tile it. A piece holds at most :data:`_ROW` values, a power of two where the row is long
    enough to be read fast. The squares of a piece are taken as its float32 norm squared, then added in float64."""
    n = x.shape[-1]
    piece = max(n, 1) if n <= _ROW else math.gcd(n, _ROW)
    if piece >= 256 or n <= _ROW:
        return x.unflatten(-1, (-1, piece)), None
    body = n - n % _ROW
    return x[..., :body].unflatten(-1, (-1, _ROW)), x[..., body:]


def _chunk_moments(x: Tensor, host: bool) -> tuple[Tensor, bool]:
    """The float64 moments of a chunk, and whether every value is known to be finite: a tensor of up to :data:`SMALL`
    values on the host with one host read (:func:`_host_heads`); else, or where a value is not finite, with none
    (:func:`_device_moments`)."""
    head = _host_heads(x) if host and x.numel() <= SMALL else None
    if head is not None:
        return head, True
    return _device_moments(x), False


def _device_moments(x: Tensor) -> Tensor:
    """The float64 moments of a chunk with no host read and no host-side decision: its values copied into a float64
    buffer, the non-finite ones zeroed there, beside float64 ones where a value is finite (those ``nan_to_num`` left as
    they were); one reduction sums both rows, the squares are norms of pieces (:func:`row_squares`: a CPU's norm adds
    each square to one running sum, 7e-14 off for 300,000 values near 1, which a variance 1e-8 of the mean square
    turns into 3e-6 of the std). About ten kernels, 76 bytes a value read and written, temporaries of 16 bytes a
    value.

    In float64, unlike the host's float32 sums, because nothing here can look at the values first to see that float32
    would do: float32 squares overflow beyond about 2**63 and underflow below 2**-63 (an exploding activation's std
    was inf, a vanishing gradient's 0), and float32 sums lose a variance that the mean dwarfs (a sigmoid's output near
    1 with a spread of 3e-4: its std 17 % off; a norm layer's gain of spread 1e-4: 0). A float32 value's square is
    exact in float64. (``x.sum(dtype=torch.float64)`` would make the same copy, hidden: torch converts a reduction's
    whole input to its result's dtype first.)"""
    n = x.numel()
    both = torch.empty(2, n, dtype=torch.float64, device=x.device)
    ok, values = both.unbind()
    values.copy_(x).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    torch.eq(x, values, out=ok)  # NaN and inf != 0
    count, total = both.sum(-1).unbind()
    squares = row_squares(values[None])[0]
    return torch.stack([count, total, squares, n - count])  # as a record: count, sum, squares, the rest


def _sampled_counts(x: Tensor, flat: Tensor, bins: Bins, divisor: Tensor | float | None, finite: bool) -> Tensor:
    """The histogram of the finite values of ``x`` (divided by ``divisor``; ``finite``: all are): of all of them up
    to :data:`HIST_SAMPLE`, else of the :func:`sample_stride` sample, scaled to the tensor's size (where values are
    not finite, its total then estimates the count of those that are)."""
    stride = sample_stride(tuple(x.shape))
    if stride == 1:
        sample = flat
    else:
        blocks = (flat.numel() - SAMPLE_BLOCK) // stride + 1
        sample = flat.as_strided((blocks, SAMPLE_BLOCK), (stride, 1))  # read where its keys are made: no copy
    sample = _summable(sample)
    if divisor is not None:
        sample = sample / divisor
    counts = bins.counts(sample, finite=finite)  # at most HIST_SAMPLE keys: a new tensor of them costs nothing
    return counts if stride == 1 else counts * (flat.numel() / sample.numel())


#: The values a record's histogram counts at most, about: above, a fixed sample of about this many
#: (:func:`sample_stride`). Plots and quantiles need two or three digits of a bin's share, not every value; counting
#: all of a large tensor cost more than its moments (issue 35's measurements: docs/cost.md).
HIST_SAMPLE = 1 << 16
#: A sample is taken in runs of this many consecutive values (64 bytes of float32: one cache line, one coalesced
#: read on a GPU): single values 257 apart cost a 4096 x 4096 record 0.5 reads of the tensor in cache misses, runs
#: of 16 a tenth of that.
SAMPLE_BLOCK = 16


@functools.lru_cache(maxsize=1024)
def sample_stride(shape: tuple[int, ...]) -> int:
    """Where the histogram of a tensor of ``shape`` samples its values: 1 (all of them) up to :data:`HIST_SAMPLE`
    values; above, runs of :data:`SAMPLE_BLOCK` values starting every ``p`` values (of the flattened tensor), ``p``
    the smallest prime that leaves at most about HIST_SAMPLE values and divides no dimension, so that every column,
    channel and position is sampled alike (a stride that divided a row's length would see the same few columns of
    every row)."""
    n = math.prod(shape)
    if n <= HIST_SAMPLE:
        return 1
    p = -(-n * SAMPLE_BLOCK // HIST_SAMPLE)
    while any(p % k == 0 for k in range(2, math.isqrt(p) + 1)) or any(d % p == 0 for d in shape):
        p += 1
    return p


def add_record(total: Tensor, record: Tensor, extra: Sequence[Tensor] = ()) -> None:
    """Add ``record`` to ``total``, a record with extra counts after its moments (``len(total) - len(record)`` of
    them), and the float64 counts ``extra`` to those (none: they are left as they are). In place, a slice at a
    time: the record is never copied with its extra counts inserted (on a GPU, two or three launches)."""
    n_extra = total.numel() - record.numel()
    total[:MOMENTS].add_(record[:MOMENTS])
    total[MOMENTS + n_extra :].add_(record[MOMENTS:])
    if extra:
        total[MOMENTS : MOMENTS + n_extra].add_(torch.stack(list(extra)))


#: fp16's smallest normal value: below it, a value keeps fewer significant bits, and below 2**-24 it is 0.
FP16_TINY = 2.0**-14
#: Extra counts of an activation-gradient record: values computed in fp16, and those of them that are
#: non-zero and below :data:`FP16_TINY` (counted as computed, before any loss scale is divided out).
HALF_EXTRA = 2


def half_counts(x: Tensor) -> list[Tensor]:
    """``x``'s two :data:`HALF_EXTRA` counts where ``x`` is fp16; none otherwise, where both are zero (bf16 has
    float32's range)."""
    if x.dtype != torch.float16:
        return []
    tiny = (x != 0) & (x.abs() < FP16_TINY)
    return [x.new_full((), float(x.numel()), dtype=torch.float64), count_true(tiny).to(torch.float64)]


#: Tensors of at most this many values are reduced together, in one pass over their concatenation: a record is
#: about twenty ops, whose launches, not their work, cost most below this size (on a 2-core CPU, seven tensors
#: of 4,096 values: 0.32 ms together, 1.5 one at a time; of 32,768: 0.59 and 1.7 ms; of 65,536: 0.91 and 2.0 ms).
#: Equal to :data:`HIST_SAMPLE`, so that whether a histogram is sampled depends on the tensor's size alone: every
#: tensor reduced together is counted whole, as it would be alone. Where a record reads no host value (a GPU),
#: larger ones are too (:data:`_GROUP_VALUES`).
SMALL = 1 << 16
#: Small tensors are reduced together on the host in groups of at most about this many values.
_GROUP = 1 << 20
#: Where a record reads no host value (a GPU), every tensor that fits in a group of at most this many values is reduced
#: with others (:func:`_grouped_records`): alone, a record is about 20 launches (5 to 10 us each on the host) and reads
#: and writes about 76 bytes a value (:func:`_device_moments`, float64 too); together, about 70, and the launches are
#: shared. The group's temporaries: 12 bytes a value, 96 MB, under the 128 MB of a GPU chunk's (:data:`_GPU_CHUNK`).
_GROUP_VALUES = 1 << 23


def tensor_records(xs: Sequence[Tensor], bins: Bins | None, divisor: Tensor | float | None = None) -> list[Tensor]:
    """The record of each tensor (divided by ``divisor``), as :func:`tensor_record` gives it, the tensors of a device
    and dtype reduced together where that saves launches (:func:`_grouped_records`, a fixed number of ops a group
    whatever the number of its tensors): on the host (:func:`host_reads_free`) those of up to :data:`SMALL` values,
    on a GPU those of up to :data:`_GROUP_VALUES`. Counts are equal to one tensor's; sums are added in another order.
    A sparse tensor's record is its dense form's (:func:`sparse_values`)."""
    values = {i: sparse_values(x) for i, x in enumerate(xs) if x.layout != torch.strided}
    out = _records_of_dense([values.get(i, x) for i, x in enumerate(xs)] if values else xs, bins, divisor)
    for i, v in values.items():  # the dense form's other values, zeros: counted, in the bin of 0, adding to no sum
        zeros = torch.zeros_like(out[i])
        zeros[COUNT] = xs[i].numel() - v.numel()
        if bins is not None:
            zeros[MOMENTS + bins.zero_bin] = zeros[COUNT]
        out[i] = out[i] + zeros
    return out


def sparse_values(t: Tensor) -> Tensor:
    """The values of a sparse tensor (a sparse gradient: ``nn.Embedding(sparse=True)``) that are not zeros of its dense
    form: those of its coalesced COO form, where repeated indices are summed (its norm is the dense form's). Coalescing
    waits for a GPU (the number of values depends on the indices)."""
    coo = t if t.layout == torch.sparse_coo else t.to_sparse(layout=torch.sparse_coo)
    return coo.detach().coalesce().values()


def _records_of_dense(xs: Sequence[Tensor], bins: Bins | None, divisor: Tensor | float | None) -> list[Tensor]:
    """:func:`tensor_records` of strided tensors."""
    out: list[Tensor | None] = [None] * len(xs)
    numels = [t.numel() for t in xs]
    together: dict[tuple[torch.device, torch.dtype], list[int]] = {}  # a multi-tensor copy's sources: one dtype
    for i, t in enumerate(xs):
        if numels[i] <= group_limits(t)[0]:
            together.setdefault((t.device, t.dtype), []).append(i)
        else:
            out[i] = tensor_record(t, bins, divisor=divisor)
    for members in together.values():
        for group in size_groups([members], numels, group_limits(xs[members[0]])[1]):
            for i, row in zip(group, _grouped_records([xs[i] for i in group], bins, divisor), strict=True):
                out[i] = row
    return out  # type: ignore[return-value]


def group_limits(x: Tensor) -> tuple[int, int]:
    """Where :func:`tensor_records` takes a record of a tensor like ``x`` with others: the most values such a tensor
    has, and the most a group holds (:data:`SMALL` and :data:`_GROUP` on the host, :data:`_GROUP_VALUES` on a GPU)."""
    return (SMALL, _GROUP) if host_reads_free(x) else (_GROUP_VALUES, _GROUP_VALUES)


@dataclass(frozen=True)
class _Layout:
    """Where :func:`_grouped_records` puts tensors of given shapes: one after another in a buffer of ``length``
    values, each in whole pieces of :data:`_ROW` (``splits``: the length of each tensor, then of the rest of its last
    piece, and so on). On the device: where those rests lie (``pads``) and their lengths (``pad_counts``, float64); the
    tensor of each piece (``owner``, int32); each tensor's number of values (``numel``, float64); where its
    histogram's sample blocks of :data:`SAMPLE_BLOCK` start (``blocks``: every value up to :data:`HIST_SAMPLE`, else
    the :func:`sample_stride` sample; a rest that a last block reads is not counted) and whose they are
    (``block_owner``); and what scales its counts to its size (``scale``, ``(tensors, 1)``)."""

    splits: tuple[int, ...]
    length: int
    pads: Tensor
    pad_counts: Tensor
    owner: Tensor
    numel: Tensor
    blocks: Tensor
    block_owner: Tensor
    scale: Tensor


@functools.lru_cache(maxsize=64)
def _layout(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> _Layout:
    """See :class:`_Layout`. Made once for the tensors of a meter, whose shapes are the same at every logging step; for
    activations whose shapes change with the batch, at each logging step: its indices are made by torch ops on the
    host, not from Python lists (16 tensors of 65,536 values: 1.2 against 6.8 ms), and the cache keeps 64 (a layout
    of 2^23 values holds up to 4 MB of indices on the device: a sample block's start for every 16 values)."""
    numels = [math.prod(shape) for shape in shapes]
    rests = [max(1, -(-k // _ROW)) * _ROW - k for k in numels]  # after each tensor, to the end of its last piece
    n, rest = torch.tensor(numels), torch.tensor(rests)
    pieces = (n + rest) // _ROW
    start = pieces.cumsum(0) * _ROW - pieces * _ROW
    stride = torch.tensor([sample_stride(shape) for shape in shapes])
    whole = stride == 1  # every value sampled, in blocks one after another
    count = torch.where(whole, (n + SAMPLE_BLOCK - 1) // SAMPLE_BLOCK, (n - SAMPLE_BLOCK) // stride + 1)
    tensor = torch.arange(len(shapes), dtype=torch.int32)
    on = functools.partial(_on_device, device=device)
    return _Layout(
        splits=tuple(v for pair in zip(numels, rests, strict=True) for v in pair),
        length=sum(numels) + sum(rests),
        pads=on(_ranges(start + n, rest, torch.ones_like(n))),
        pad_counts=on(rest.double()),
        owner=on(tensor.repeat_interleave(pieces)),
        numel=on(n.double()),
        blocks=on(_ranges(start, count, torch.where(whole, SAMPLE_BLOCK, stride))),
        block_owner=on(tensor.repeat_interleave(count)),
        scale=on(torch.where(whole, 1.0, n.double() / (count * SAMPLE_BLOCK))[:, None]),
    )


def _ranges(first: Tensor, length: Tensor, step: Tensor) -> Tensor:
    """``first[i] + step[i] * k`` for ``k < length[i]``, for each ``i`` in turn (int64, on the host)."""
    at = torch.arange(len(first)).repeat_interleave(length)  # whose each one is
    k = torch.arange(at.numel()) - (length.cumsum(0) - length)[at]
    return first[at] + k * step[at]


def _grouped_records(xs: Sequence[Tensor], bins: Bins | None, divisor: Tensor | float | None = None) -> Tensor:
    """The records of ``xs`` (one device and dtype), ``(len(xs), size)``, in a fixed number of ops whatever their
    number: all copied into one buffer in whole pieces of :data:`_ROW` values (:func:`_layout`; one multi-tensor copy),
    the pieces summed and added into their tensors' sums. On the host (:func:`_host_group`) in their precision and
    checked in one read; where a value is not finite, or where reading costs a wait (a GPU), in float64 with none
    (:func:`_clean_group`)."""
    with torch.no_grad():
        layout = _layout(tuple(tuple(t.shape) for t in xs), xs[0].device)
        rows = _host_group(xs, layout, bins, divisor) if host_reads_free(xs[0]) else None
        return _clean_group(xs, layout, bins, divisor) if rows is None else rows


def _filled(xs: Sequence[Tensor], layout: _Layout, dtype: torch.dtype, nan: bool) -> Tensor:
    """A buffer of ``layout`` holding ``xs`` in ``dtype``, and NaN (``nan``) or zeros in the rest of each last piece.
    On a GPU one multi-tensor copy (one kernel for the tensors of a dtype; a concatenation of mixed dtypes copies them
    one launch each); on a CPU, where that copy is a loop of copies, one concatenation with the rests between them (a
    third of the time, for 200 tensors)."""
    device = xs[0].device
    if launch_bound(device):
        values = torch.empty(layout.length, dtype=dtype, device=device)
        values.index_fill_(0, layout.pads, math.nan if nan else 0.0)
        # reshape(-1) is a view of a contiguous tensor
        torch._foreach_copy_(values.split(layout.splits)[::2], [t.reshape(-1) for t in xs])
        return values
    parts: list[Tensor] = []
    for t, rest in zip(xs, _rests(layout.splits[1::2], dtype, nan, device), strict=True):
        parts.append(t)
        if rest is not None:
            parts.append(rest)
    values = _flatten_dense_tensors(parts)  # promoted to the rests' dtype where there are rests
    if values.dtype != dtype:
        return values.to(dtype)
    # of one contiguous tensor that fills its pieces, a view of it (of a strided one, already a copy): the buffer is
    # the caller's to write into (its keys, a divisor), never the tensor's (a weight's gradient before the optimizer's
    # step, a held activation)
    return values.clone() if values.data_ptr() == parts[0].data_ptr() else values


@functools.lru_cache(maxsize=64)
def _rests(lengths: tuple[int, ...], dtype: torch.dtype, nan: bool, device: torch.device) -> tuple[Tensor | None, ...]:
    """NaN or zeros of each of ``lengths`` (None where 0): views of one tensor, made once for a layout."""
    fill = torch.full((max(lengths),), math.nan if nan else 0.0, dtype=dtype, device=device)
    return tuple(fill[:n] if n else None for n in lengths)


def _by_tensor(layout: _Layout, parts: Sequence[Tensor]) -> Tensor:
    """Per-piece sums ``parts`` added into their tensors', in float64: ``(len(parts), tensors)``."""
    stacked = torch.stack(list(parts)).double()
    out = torch.zeros(len(parts), layout.numel.numel(), dtype=torch.float64, device=stacked.device)
    return out.index_add_(1, layout.owner, stacked)


def _host_group(
    xs: Sequence[Tensor], layout: _Layout, bins: Bins | None, divisor: Tensor | float | None
) -> Tensor | None:
    """:func:`_grouped_records` on the host, or None where a value is not finite: the buffer in the tensors' precision
    (float32 but for float64) with zeros after each tensor; the sums of its pieces read once (a NaN or an Inf makes a
    sum of squares non-finite). As a large tensor's (:func:`_fast_moments`), a tensor whose squares underflow float32
    (its values all below about 2**-40, or zeros) or whose mean dwarfs its spread (:func:`_cancels`: a norm layer's
    gain) is summed again in float64, so that its variance keeps its digits. The histogram counts every value of the
    buffer (the tensors of a group on the host have at most :data:`SMALL` values: their histograms are not sampled),
    and takes the zeros after each tensor out of the bin of zero."""
    values = _filled(xs, layout, torch.float64 if xs[0].dtype == torch.float64 else torch.float32, nan=False)
    pieces = values.view(-1, _ROW)
    n = layout.numel
    s, ss = _by_tensor(layout, [pieces.sum(-1), torch.linalg.vector_norm(pieces, dim=-1).square_()])
    # one read: whether every value is finite, and which tensors to sum again
    total, *again = torch.cat([ss.sum().view(1), (_inexact(n, s, ss) & (n > 0)).double()]).tolist()
    if not math.isfinite(total):
        return None
    head = torch.stack([n, s, ss, torch.zeros_like(n)], dim=1)
    redo = [i for i, flag in enumerate(again) if flag]
    if redo:
        exact = [xs[i].detach().double() for i in redo]
        head[redo, 1:3] = torch.stack([torch.stack([v.sum(), v.square().sum()]) for v in exact])
    if divisor is not None:
        head = head * _moment_scale(divisor, head)
    if bins is None:
        return head
    if divisor is not None:
        values.div_(divisor)
    counts = bins.counts(pieces, owners=(layout.owner, len(xs)), finite=True, scratch=True)
    counts[:, bins.zero_bin] -= layout.pad_counts
    return torch.cat([head, counts], dim=1)


def _clean_group(xs: Sequence[Tensor], layout: _Layout, bins: Bins | None, divisor: Tensor | float | None) -> Tensor:
    """:func:`_grouped_records` with no host read, in about 25 launches: the buffer in float64 with NaN after each
    tensor, each record's histogram sample taken from it (as :func:`tensor_record` samples), then its finite values
    counted, summed and squared by pieces. Float64, as :func:`_device_moments` takes a chunk's, so that the moments
    keep the digits of a variance that the mean dwarfs (a norm layer's gain) and squares never over- or underflow.

    Its temporaries: 12 bytes a value (up to :data:`_GROUP_VALUES` values), their sample, and per piece a few floats;
    about 70 bytes a value read and written.
    """
    values = _filled(xs, layout, torch.float64, nan=True)
    sample = None
    if bins is not None:  # as tensor_record takes it: in float32 unless the tensors are float64
        sample = values.unfold(0, SAMPLE_BLOCK, 1).index_select(0, layout.blocks)
        sample = sample if xs[0].dtype == torch.float64 else sample.float()
    # float32 ones where a value is finite (not a rest): a piece's sum of them is exact
    ok = where_finite(values, out=values.new_empty(values.shape, dtype=torch.float32))
    pieces = values.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).view(-1, _ROW)
    n, s, ss = _by_tensor(
        layout, [ok.view(-1, _ROW).sum(-1), pieces.sum(-1), torch.linalg.vector_norm(pieces, dim=-1).square_()]
    )
    head = torch.stack([n, s, ss, layout.numel - n], dim=1)
    if divisor is not None:
        head = head * _moment_scale(divisor, head)
    if sample is None:
        return head
    if divisor is not None:
        sample = sample / divisor
    counts = bins.counts(sample, owners=(layout.block_owner, len(xs)), scratch=True)  # type: ignore[union-attr]
    return torch.cat([head, counts * layout.scale], dim=1)


def size_groups(on_devices: Iterable[list[int]], numels: Sequence[int], limit: int = _GROUP) -> list[list[int]]:
    """The indices of the tensors of each device (one list per device) split into groups of at most ``limit`` values
    (a tensor alone where it is larger), ordered by size: each size's tensors side by side, the rows of one matrix."""
    out = []
    for members in on_devices:
        group: list[int] = []
        total = 0
        for i in sorted(members, key=numels.__getitem__):
            if group and total + numels[i] > limit:
                out.append(group)
                group, total = [], 0
            group.append(i)
            total += numels[i]
        out.append(group)
    return out


def _host_heads(x: Tensor) -> Tensor | None:
    """The float64 moments ``(n, sum, sum of squares, 0)`` of the 1-D ``x`` of up to :data:`SMALL` values if every
    value is finite, checked on the host in one read; None otherwise. Summed in float64 at once: the copy (at most
    512 kB) costs about what the dozen ops of float32 pieces did (3,200 values: 13 against 43 µs; 65,536: 49 against
    42, on this 2-core CPU), and the sums need no second look where the mean dwarfs the spread."""
    d = x.double()
    s, ss = torch.stack([d.sum(), d.square().sum()]).tolist()  # pairwise sums (dot: one running sum, 1e-11 off)
    # (not in place: a float64 x is its own .double())
    return torch.tensor([x.numel(), s, ss, 0.0], dtype=torch.float64) if math.isfinite(ss) else None


def _inexact(n: Any, s: Any, ss: Any) -> Any:
    """Whether float32 sums ``s``, ``ss`` of ``n`` values may have lost the moments' digits: squares under
    :data:`_TINY_SQUARES`, or a mean that dwarfs the spread (:func:`_cancels`). Of numbers, or of tensors of them."""
    return (ss < _TINY_SQUARES) | _cancels(n, s, ss)


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
        return cls(tuple(edges), tuple(record[start : start + len(edges) + 1]))

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


def saturation_extra(mask: Tensor, finite: Tensor | None, unit_dim: int, count: Tensor) -> tuple[Tensor, Tensor]:
    """Saturated count, and per unit the number of examples in which it is *not* saturated; ``finite`` masks the
    values counted (None: all are), ``count`` is how many they are (the record's finite count).

    A unit (a feature along ``unit_dim``) whose count stays 0 over the whole logging step is dead: saturated
    for every example, a white column of the lecture's ``imshow(h.abs() > 0.99)``. One count per unit, of the values
    finite and not saturated; the saturated ones are the rest of ``count`` (one reduction over the values, not two).
    """
    if mask.dim() == 0:
        mask, finite, unit_dim = mask.reshape(1), None if finite is None else finite.reshape(1), 0
    kept = torch.logical_not(mask) if finite is None else torch.gt(finite, mask)  # finite and not saturated
    others = tuple(d for d in range(mask.dim()) if d != unit_dim % mask.dim())
    # over the other dimensions in place (no copy to put the units last), in int32: torch reduces a bool mask by
    # first copying it whole to the result's dtype (count_nonzero too, to int64)
    alive = (kept.sum(dim=others, dtype=torch.int32) if others else kept.int()).double()
    return count - alive.sum(), alive
