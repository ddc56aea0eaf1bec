"""Which elements of a weight the flight recorder keeps to measure its update: by default a fixed sample of about
1 % of them (every :data:`STRIDE`-th element of the flat weight), so that the copy kept across the optimizer step
costs 1 % of the watched weights' bytes instead of 100 %. A sample's norm, times ``sqrt(numel / sampled)``,
estimates the whole update's norm; ``docs/flight-recorder.md`` has its error, measured.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["LEAST", "MODES", "STRIDE", "sampled", "stride"]

#: How the update norms are measured: from a sample of each weight's elements, from a full copy, or not at all.
MODES = ("sampled", "exact", "off")
STRIDE = 101  # every 101st element: 1 %; a prime, so that the sample does not fall on the same few columns
LEAST = 256  # a weight too small to give this many elements at STRIDE is sampled more densely (its bytes are few)
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, STRIDE)


def stride(numel: int, mode: str = "sampled") -> int:
    """The stride of a weight's sample: :data:`STRIDE`, or for a weight too small to give :data:`LEAST` elements at
    it, the largest prime that does (1, every element, for the smallest; and for ``mode="exact"``)."""
    if mode != "sampled":
        return 1
    return next((p for p in reversed(_PRIMES) if numel // p >= LEAST), 1)


def sampled(part: Tensor, step: int) -> Tensor:
    """The sampled elements of ``part``, a view (nothing copied): every ``step``-th of its flat elements; the whole
    tensor where ``step`` is 1 or it cannot be viewed flat (not contiguous)."""
    if step == 1 or not part.is_contiguous():
        return part
    return part.view(-1)[::step]
