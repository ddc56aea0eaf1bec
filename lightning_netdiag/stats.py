"""The statistics: pure torch, no Lightning.

Every measurement is an *additive record*: a float64 vector of counts and sums that can be added across
micro-batches, ranks and shards and divided once, at the end. Its layout is

    [count of finite values, sum, sum of squares, count of non-finite values, <extra counts>, *histogram]

where the histogram counts the values over fixed edges, with one open bin below the first edge and one
above the last (bin ``i`` holds ``edges[i-1] <= x < edges[i]``); non-finite values are counted as 0 there
and taken out when the record is read, so that only finite values are ever shown.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Slots every record starts with: finite count, sum, sum of squares, non-finite count.
MOMENTS = 4
COUNT, SUM, SUMSQ, NONFINITE = range(MOMENTS)

#: The lecture's tanh saturation threshold: |tanh| > 0.97.
DEFAULT_THRESHOLD = 0.97


def linear_edges(low: float, high: float, bins: int = 50) -> Tensor:
    """Evenly spaced edges for a bounded activation (tanh on [-1, 1], sigmoid on [0, 1])."""
    return torch.linspace(low, high, bins + 1, dtype=torch.float32)


def symlog_edges(min_exp: int = -9, max_exp: int = 3, per_decade: int = 4) -> Tensor:
    """Signed log-spaced edges, ``-10**max_exp .. -10**min_exp, 10**min_exp .. 10**max_exp``.

    Gradients span many decades (1e-6 .. 1e-1 is common), so no linear range fits them all; these edges
    resolve every scale with a constant relative width, and the middle bin holds exact zeros.
    """
    magnitudes = torch.logspace(min_exp, max_exp, (max_exp - min_exp) * per_decade + 1, dtype=torch.float64)
    return torch.cat([-magnitudes.flip(0), magnitudes]).float()


def record_size(edges: Tensor | None, extra: int = 0) -> int:
    """Length of a record with ``extra`` counts after the moments and a histogram over ``edges``."""
    return MOMENTS + extra + (0 if edges is None else edges.numel() + 1)


def tensor_record(x: Tensor, edges: Tensor | None, extra: Sequence[Tensor] = ()) -> Tensor:
    """The additive record of ``x``: moments of its finite values, ``extra`` counts, histogram counts.

    Runs on ``x``'s device, never synchronises with the host, and leaves ``x`` untouched.
    """
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # half and bf16 are summed in float32 or more
    # Non-finite values become 0 and are counted; they are left out of every other statistic, and the
    # histogram's zero bin gives them back when it is read (Histogram.of). Two single-pass kernels, where
    # isfinite + where would take five.
    xz = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    n_finite = (x == xz).sum(dtype=torch.float64)
    parts = [
        n_finite,
        xz.sum(dtype=torch.float64),
        (xz * xz).sum(dtype=torch.float64),
        x.numel() - n_finite,
        *(e.to(torch.float64) for e in extra),
    ]
    head = torch.stack(parts)
    if edges is None:
        return head
    return torch.cat([head, histogram_counts(xz, edges)])


def histogram_counts(x: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``x`` over ``edges`` plus the two open outer bins, on ``x``'s device.

    Not ``bincount``: on CUDA it synchronises (it reads the maximum index), and under torch.compile its
    data-dependent output size breaks the graph.
    """
    index = torch.bucketize(x, edges, right=True).flatten()
    ones = torch.ones((), dtype=torch.float64, device=x.device).expand(index.numel())
    return torch.zeros(edges.numel() + 1, dtype=torch.float64, device=x.device).index_add_(0, index, ones)


def zero_bin(edges: Sequence[float]) -> int:
    """The bin that holds 0 (bin ``i`` holds ``edges[i-1] <= x < edges[i]``)."""
    return bisect.bisect_right(edges, 0.0)


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


# --- saturation: where an activation's derivative is (nearly) zero -------------------------------------


@dataclass(frozen=True)
class SaturationRule:
    """Where an activation kind is flat. ``on_input`` rules read the module's input, the others its output."""

    kind: str
    region: str
    mask: Callable[[Tensor], Tensor]
    edges: Tensor
    on_input: bool = False


_SELU_LIMIT = 1.0507009873554805 * 1.6732632423543772  # SELU's negative asymptote, scale * alpha


def saturation_rule(module: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> SaturationRule | None:
    """The saturation rule for ``module``'s activation kind, or None if it is not a known activation.

    ``threshold`` applies to the smoothly bounded kinds (tanh-like, sigmoid-like, the ELU family,
    softplus); the kinds with an exactly flat region use that region; GELU, SiLU and Mish, whose output
    does not tell the flat tail from the origin, are judged on their input.
    """
    thr = threshold
    unbounded = symlog_edges()
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        lo, hi = float(module.min_val), float(module.max_val)
        return SaturationRule(
            "clamp", f"t <= {lo:g} or t >= {hi:g}", lambda t: (t <= lo) | (t >= hi), linear_edges(lo, hi)
        )
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return SaturationRule("tanh", f"|t| > {thr:g}", lambda t: t.abs() > thr, linear_edges(-1.0, 1.0))
    if isinstance(module, nn.Sigmoid):
        return SaturationRule(
            "sigmoid", f"t < {1 - thr:g} or t > {thr:g}", lambda t: (t < 1 - thr) | (t > thr), linear_edges(0.0, 1.0)
        )
    if isinstance(module, nn.Hardsigmoid):
        return SaturationRule("clamp", "t <= 0 or t >= 1", lambda t: (t <= 0) | (t >= 1), linear_edges(0.0, 1.0))
    if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)):
        return SaturationRule("relu", "t <= 0", lambda t: t <= 0, unbounded)
    if isinstance(module, (nn.ELU, nn.CELU)):
        limit = thr * float(module.alpha)
        return SaturationRule("elu", f"t < {-limit:g}", lambda t: t < -limit, unbounded)
    if isinstance(module, nn.SELU):
        limit = thr * _SELU_LIMIT
        return SaturationRule("elu", f"t < {-limit:g}", lambda t: t < -limit, unbounded)
    if isinstance(module, nn.Softplus):
        # softplus' derivative is 1 - exp(-beta * t): below 1 - thr where t < -ln(thr) / beta.
        limit = -math.log(thr) / float(module.beta)
        return SaturationRule("softplus", f"t < {limit:.3g}", lambda t: t < limit, unbounded)
    if isinstance(module, nn.LogSigmoid):
        # log-sigmoid's derivative is 1 - exp(t): below 1 - thr where t > ln(thr).
        limit = math.log(thr)
        return SaturationRule("logsigmoid", f"t > {limit:.3g}", lambda t: t > limit, unbounded)
    if isinstance(module, (nn.Hardshrink, nn.Softshrink)):
        return SaturationRule("shrink", "t == 0", lambda t: t == 0, unbounded)
    if isinstance(module, (nn.GELU, nn.Hardswish)):
        # GELU's derivative is below 0.012 in magnitude for x < -3; Hardswish is exactly flat there.
        return SaturationRule("gelu", "input x < -3", lambda x: x < -3, unbounded, on_input=True)
    if isinstance(module, (nn.SiLU, nn.Mish)):
        # SiLU's and Mish's derivatives are below 0.03 in magnitude for x < -5.
        return SaturationRule("silu", "input x < -5", lambda x: x < -5, unbounded, on_input=True)
    return None


#: The activation module types watched by default: every kind that has a saturation rule.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.Softsign, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.ReLU, nn.LeakyReLU, nn.PReLU,
    nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    nn.GELU, nn.Hardswish, nn.SiLU, nn.Mish,
)  # fmt: skip


def saturation_extra(mask: Tensor, finite: Tensor, unit_dim: int) -> tuple[Tensor, Tensor]:
    """Saturated count, and per unit the number of examples in which it is *not* saturated.

    A unit (a feature along ``unit_dim``) whose count stays 0 over the whole logging step is dead: saturated
    for every example, a white column of the lecture's ``imshow(h.abs() > 0.99)``.
    """
    saturated = mask & finite
    alive = (~saturated & finite).movedim(unit_dim, -1) if mask.dim() > 0 else (~saturated).reshape(1)
    return saturated.sum(dtype=torch.float64), alive.reshape(-1, alive.shape[-1]).sum(0, dtype=torch.float64)
