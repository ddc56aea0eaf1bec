"""Attention and output logits: what counts as an attention call, the exact largest logit its softmax sees, and
the hooks that watch them in a forward. Pure torch, no Lightning.

An attention call is one of

- **eager**: a softmax over the last dimension of a 4-D score tensor ``[batch, heads, queries, keys]`` (GPT-2,
  LLaMA and BERT's eager implementations in transformers, timm, nanoGPT's slow path, hand-written models); its
  largest logit is the largest value of the scores (masked positions hold -inf or the dtype's minimum: never
  the largest); q and k are the operands of the latest matrix product, in the same module, whose result had
  the scores' shape;
- **fused**: ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``,
  whose scores nobody sees: :func:`sdpa_scores` computes them again, a block of queries at a time; and
  ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision's ViT, ``nn.Transformer*``), one
  torch function for the whole attention, whose q and k :func:`mha_qk` projects again.

A call is named by the module whose forward made it (``transformer.h.0.attn``), like the functional activation
calls (:mod:`lightning_netdiag.capture`). A module whose class is named like an attention (``*Attention*``,
``*Attn*``) that runs without making one of these calls runs its attention in a kernel nothing here can see
(flash-attn, xformers, a custom op): it is listed as *unwatched*, never silently left out.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_netdiag.capture import BACKWARD, FORWARD, IDLE, HookHandles, OutputProbe, own_work, watching
from lightning_netdiag.stats import launch_bound

__all__ = [
    "BLOCK_ELEMENTS", "GPU_BLOCK_ELEMENTS", "MASKED", "AttentionHooks", "AttentionLayer", "block_size", "has_qk_norm",
    "is_attention_module", "mha_qk", "query_blocks", "score_stats", "sdpa_scores",
]  # fmt: skip

#: The most score elements computed at once to measure an attention's scores on a CPU: 2**22 float32
#: values (16 MiB), whatever the sequence length (GPT-2 at 1024 tokens, batch 8, 12 heads: 1/24 of one score tensor).
BLOCK_ELEMENTS = 2**22
#: The same on a GPU (64 MiB), where each block's kernels cost their launches on the host whatever their size.
GPU_BLOCK_ELEMENTS = 2**24

#: A score at or below this is a masked key: masks fill -inf, the dtype's minimum, -1e9 or add -1e4 (its softmax
#: weight, below e^-5000, is 0 in any float format); a logit this low unmasked sits in a one-hot row anyway.
MASKED = -5e3

_ATTENTION_CLASS = re.compile(r"Attention|Attn")
#: a child module that normalises q or k: ``q_norm``, ``k_layernorm``, ``query_norm``, ``k_ln`` ...
_QK_NORM = re.compile(r"^(q|k|query|key)_?(norm|ln|layernorm|layer_norm)$", re.IGNORECASE)


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module``'s class is named like an attention: one that should make an attention call."""
    return _ATTENTION_CLASS.search(type(module).__name__) is not None


def has_qk_norm(module: nn.Module) -> bool:
    """Whether ``module`` (an attention) holds a layer that normalises q or k (qk-layernorm)."""
    return any(
        _QK_NORM.match(name.rsplit(".", 1)[-1]) and not isinstance(m, nn.Identity)  # timm's q_norm when off
        for name, m in module.named_modules()
        if name
    )


def score_stats(blocks: Iterable[Tensor], softmaxes: Iterable[Tensor] | None = None) -> Tensor:
    """``[largest logit, sum of the rows' normalised entropies, rows]`` (float64) of an attention's scores, given
    as blocks of whole rows (the last dimension: the keys). A score at or below :data:`MASKED` is a masked key
    (masks fill -inf, the dtype's minimum, -1e9 or -1e4): never the largest, no weight in its row's softmax. A
    row's normalised entropy is ``H(softmax(row)) / log(keys not masked)``: 1 when the softmax is uniform, 0 when
    it is one-hot; rows with fewer than two keys not masked are not counted. ``softmaxes``: the softmax of each
    block where the model computed it (an eager attention's), not computed again. On the blocks' device (they
    come at least one, empty where there are no queries)."""
    parts = []
    given = None if softmaxes is None else iter(softmaxes)
    device = None
    with torch.no_grad():
        for block in blocks:
            s, device = block.detach().float(), block.device
            p = None if given is None else next(given).detach().float()
            if not s.numel():
                continue
            # the keys not masked in each row, summed as float32 ones (a bool mask's sum copies it whole to int64)
            keys = torch.gt(s, MASKED, out=torch.empty_like(s)).sum(-1)
            if p is None:
                p = torch.softmax(s, dim=-1)  # a masked key's weight: below e^-5000 next to its row's largest, 0
            counted = keys > 1
            h = torch.special.entr(p).sum(-1) / keys.clamp_min(2).log()
            entropy = torch.where(counted, h, 0.0).sum(dtype=torch.float64)
            parts.append(torch.stack([s.amax().double(), entropy, counted.sum(dtype=torch.float64)]))
        if not parts:
            return torch.tensor([-math.inf, 0.0, 0.0], dtype=torch.float64, device=device)
        both = torch.stack(parts)
        return torch.cat([both[:, 0].amax().reshape(1), both[:, 1:].sum(0)])


def query_blocks(scores: Tensor, block_elements: int | None = None) -> Iterator[Tensor]:
    """An eager attention's score tensor ``[..., queries, keys]`` as blocks of queries of about ``block_elements``
    scores (default: :func:`block_size`), so that their float32 copies stay small; one empty block where there
    are no queries."""
    rows = max(1, block_size(scores.device, block_elements) // max(1, scores[..., :1, :].numel()))
    for start in range(0, max(1, scores.shape[-2]), rows):
        yield scores[..., start : start + rows, :]


def sdpa_scores(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    block_elements: int | None = None,
) -> Iterator[Tensor]:
    """The scores the softmax of ``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
    scale=scale, enable_gqa=enable_gqa)`` sees, computed again in float32 a block of queries at a time, so that at
    most about ``block_elements`` scores exist at once (default: :func:`block_size`).

    The scores are ``q @ k.T * scale`` (+ a float mask; a boolean mask keeps where True, -inf elsewhere;
    ``is_causal``: the lower triangle, aligned top-left as SDPA does). Grouped-query heads (fewer k heads than q
    heads) are repeated as SDPA repeats them. One empty block where there are no queries.
    """
    length, keys = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # detached inputs build no graph (a generator cannot hold torch.no_grad across its yields)
    q, k = q.detach(), k.detach()
    mask = None if attn_mask is None else attn_mask.detach()
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] not in (1, q.shape[-3]):  # grouped-query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    kt = k.float().transpose(-2, -1)
    per_row = max(1, q[..., :1, :1].numel() * keys)
    rows = max(1, block_size(q.device, block_elements) // per_row)
    for start in range(0, max(1, length), rows):
        stop = min(length, start + rows)
        s = (q[..., start:stop, :].float() @ kt) * scale
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
            s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.float()
        if is_causal:  # key j is past query i where j > i + start
            past = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).triu_(diagonal=start + 1)
            s = s.masked_fill(past, -math.inf)
        yield s


def block_size(device: torch.device, block_elements: int | None = None) -> int:
    """``block_elements``, or the default for ``device``: :data:`GPU_BLOCK_ELEMENTS` where launches bound the work
    (:func:`lightning_netdiag.stats.launch_bound`), else :data:`BLOCK_ELEMENTS`."""
    if block_elements is not None:
        return block_elements
    return GPU_BLOCK_ELEMENTS if launch_bound(device) else BLOCK_ELEMENTS


_MHA = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
)  # fmt: skip


def mha_qk(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The q, k (``[batch, heads, length, head_dim]``) and the mask (boolean, True: attend; or float, added) of
    a call of ``F.multi_head_attention_forward``, as SDPA would take them; None for the rare forms not followed here
    (``bias_k``, ``add_zero_attn``, ``static_k``: the call is then listed as unwatched)."""
    a = dict(zip(_MHA, _bind(args, kwargs, _MHA, (None,) * len(_MHA)), strict=True))
    if a["bias_k"] is not None or a["add_zero_attn"] or a["static_k"] is not None:
        return None
    query, key, heads = a["query"], a["key"], int(a["num_heads"])
    width = query.shape[-1]
    bias = a["in_proj_bias"]
    bq, bk = (None, None) if bias is None else (bias[:width], bias[width : 2 * width])
    if a["use_separate_proj_weight"]:
        wq, wk = a["q_proj_weight"], a["k_proj_weight"]
    else:
        wq, wk = a["in_proj_weight"][:width], a["in_proj_weight"][width : 2 * width]
    with torch.no_grad():
        q, k = F.linear(query.detach(), wq, bq), F.linear(key.detach(), wk, bk)
        if q.dim() == 2:  # unbatched: (length, width)
            q, k = q.unsqueeze(1), k.unsqueeze(1)
        (length, batch, _), keys = q.shape, k.shape[0]
        q = q.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)
        k = k.reshape(keys, batch, heads, -1).permute(1, 2, 0, 3)
        # nn.MultiheadAttention's masks say where *not* to attend (True), or are added; as one SDPA mask
        masks = []
        if a["attn_mask"] is not None:
            m = a["attn_mask"]
            masks.append(m.reshape(batch, heads, length, keys) if m.dim() == 3 else m)
        if a["key_padding_mask"] is not None:
            masks.append(a["key_padding_mask"].reshape(batch, 1, 1, keys))
        if all(m.dtype == torch.bool for m in masks):
            keep = None if not masks else functools.reduce(torch.logical_and, [~m for m in masks])
            return q, k, keep
        added = [
            m.float() if m.dtype != torch.bool else torch.zeros(m.shape, device=m.device).masked_fill(m, -math.inf)
            for m in masks
        ]
        return q, k, functools.reduce(torch.add, added)


class AttentionLayer:
    """One watched attention call: its records over a step. ``peak``: the largest logit; ``sums`` (additive): the
    sum of squares and the count of q's elements, the same of k's (for their RMS), the sum of the rows' normalised
    entropies and the count of rows (for their mean)."""

    SUMS = 6

    def __init__(self, name: str, fused: bool, qk_norm: bool) -> None:
        self.name, self.fused, self.qk_norm = name, fused, qk_norm
        self.order: int | None = None  # position of its first call in the forward: depth order
        self.peak: Tensor | None = None
        self.sums: Tensor | None = None

    @property
    def depth(self) -> tuple[bool, int]:
        """Sorts calls in the order of their first call; those never run (here) last."""
        return (self.order is None, self.order or 0)

    def allocate(self, device: torch.device) -> None:
        if self.peak is None or self.peak.device != device:
            self.peak = torch.full((1,), -math.inf, dtype=torch.float64, device=device)
            self.sums = torch.zeros(self.SUMS, dtype=torch.float64, device=device)
        else:
            self.reset()

    def reset(self) -> None:
        if self.peak is not None and self.sums is not None:
            self.peak.fill_(-math.inf)
            self.sums.zero_()

    def add(self, stats: Tensor, q: Tensor | None, k: Tensor | None) -> None:
        """One call's :func:`score_stats` and its q and k (None where they were not seen)."""
        sums: Tensor = self.sums  # type: ignore[assignment]
        torch.maximum(self.peak, stats[:1], out=self.peak)  # type: ignore[arg-type]
        sums[4:].add_(stats[1:])
        if q is not None and k is not None:
            for i, t in enumerate((q, k)):
                sums[2 * i].add_(t.detach().float().pow(2).sum())
                sums[2 * i + 1].add_(t.numel())  # a host number as a kernel argument: no copy, no wait for the GPU


class AttentionHooks:
    """Every attention call of the model's armed forwards, and its output (an :class:`OutputProbe`).

    While a step is armed (:meth:`start` to :meth:`stop`) a ``TorchFunctionMode`` sees softmax, the fused
    attention and the matrix products, and global module hooks keep the stack of modules that run (the owner of
    a call; the attention modules that made none). A recomputed forward (activation checkpointing, in the
    backward) records nothing again.

    Args:
        model: the model whose modules own the calls.
        max_calls: the number of calls per owner module in one forward with a layer of their own.
    """

    def __init__(self, model: nn.Module, max_calls: int = 16) -> None:
        self.max_calls = max_calls
        self.phase = IDLE
        self.layers: list[AttentionLayer] = []
        self.output = OutputProbe()
        self.unwatched: set[str] = set()  # attention modules that ran and made no call seen here
        self._root = model
        self._names = {id(m): name for name, m in model.named_modules()}
        self._attention = {id(m): m for m in model.modules() if is_attention_module(m)}
        self._ran: set[int] = set()  # attention modules that ran in an armed forward
        self._seen: set[int] = set()  # attention modules that made (or contain) a watched call
        self._by_key: dict[tuple, AttentionLayer] = {}
        self._calls: dict[int, int] = {}
        self._order = 0
        self._stack: list[nn.Module] = []
        self._products: dict[int, tuple[torch.Size, Tensor, Tensor]] = {}  # owner -> its latest 4-D product
        self._device: torch.device | None = None
        self._mode = _AttentionCapture(self)
        self._capture = HookHandles()
        self._looked = False  # an armed forward ran: its calls were looked for

    # --- when: the meter drives these -----------------------------------------------------------------

    def prepare(self, device: torch.device) -> None:
        """Zeroed records on ``device``, before the first armed forward of a step."""
        self._device = device
        for layer in self.layers:
            layer.allocate(device)
        self.output.reset()

    def start(self) -> None:
        """An armed forward begins."""
        self.phase, self._calls, self._products = FORWARD, {}, {}
        self.output.start(self._root)
        if not len(self._capture) and self._looks_for_calls():
            self._stack.clear()
            self._capture.watch_calls(self._mode, self._enter, self._leave)

    def _looks_for_calls(self) -> bool:
        """Whether an armed forward passes through the function mode: the first does; after it, only a model with
        attention modules or calls seen (an MLP's forward then pays for no Python handler on each torch call)."""
        return not self._looked or bool(self._attention) or bool(self.layers)

    def backward(self) -> None:
        if self.phase == FORWARD:
            self.phase = BACKWARD
        self._products = {}

    def backward_done(self) -> None:
        if self.phase == BACKWARD:
            self.phase, self._calls = FORWARD, {}

    def stop(self) -> None:
        if self.phase == IDLE:  # nothing armed since the last stop (each step between logging steps)
            return
        self._looked, self.phase = True, IDLE
        self._capture.remove()
        self.output.stop()
        self._products = {}
        self.unwatched = {self._names[i] or "model" for i in self._ran if i not in self._seen}

    def remove(self) -> None:
        self.stop()
        for layer in self.layers:
            layer.peak = layer.sums = None

    # --- the hooks ------------------------------------------------------------------------------------

    def _enter(self, module: nn.Module, inputs: object) -> None:
        if id(module) in self._names and watching():
            self._stack.append(module)
            if id(module) in self._attention and self.phase == FORWARD:
                self._ran.add(id(module))

    def _leave(self, module: nn.Module, inputs: object, output: object) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _owner(self) -> nn.Module:
        return self._stack[-1] if self._stack else self._root

    def product(self, a: Tensor, b: Tensor, out: Tensor) -> None:
        """A matrix product of two (at least) 3-D tensors: maybe q @ k.T, kept until its module's softmax."""
        if self.phase == FORWARD:
            self._products[id(self._owner())] = (out.shape, a, b)

    def softmax(self, scores: Tensor, weights: Tensor) -> None:
        """A softmax over the scores' last dimension (an eager attention) and its output, the attention weights:
        their entropy is read from them where they are float32 or wider (a half-precision softmax, from the
        scores)."""
        if self.phase != FORWARD:
            return
        owner = self._owner()
        product = self._products.pop(id(owner), None)
        q, k = (product[1], product[2]) if product is not None and product[0] == scores.shape else (None, None)
        wide = weights.shape == scores.shape and weights.dtype in (torch.float32, torch.float64)
        with own_work():
            stats = score_stats(query_blocks(scores), query_blocks(weights) if wide else None)
            self._record(owner, False, stats, q, k)

    def fused(self, q: Tensor, k: Tensor, stats: Callable[[], Tensor]) -> None:
        """A fused attention of ``q`` and ``k``; ``stats()`` computes its :func:`score_stats`."""
        if self.phase == FORWARD:
            with own_work():
                self._record(self._owner(), True, stats(), q, k)

    def _record(self, owner: nn.Module, fused: bool, stats: Tensor, q: Tensor | None, k: Tensor | None) -> None:
        for m in self._stack:
            self._seen.add(id(m))
        self._seen.add(id(owner))
        k_call = min(self._calls.get(id(owner), 0) + 1, self.max_calls)
        self._calls[id(owner)] = k_call
        key = (id(owner), k_call)
        layer = self._by_key.get(key)
        if layer is None:
            base = self._names.get(id(owner)) or "model"
            name = base if k_call == 1 else f"{base}-{k_call}"
            layer = self._by_key[key] = AttentionLayer(name, fused, has_qk_norm(owner))
            self.layers.append(layer)
            if self._device is not None:
                layer.allocate(self._device)
        if layer.order is None:
            layer.order, self._order = self._order, self._order + 1
        if layer.peak is not None:
            layer.add(stats, q, k)


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
    """The values of a call's parameters ``names`` (positional or keyword), else their defaults."""
    return [
        args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True))
    ]


_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}
_PRODUCTS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


class _AttentionCapture(TorchFunctionMode):
    """Hands softmax, fused attention and matrix products to :class:`AttentionHooks`; passes everything."""

    def __init__(self, hooks: AttentionHooks) -> None:
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling() or not watching():
            return func(*args, **kwargs)
        hooks = self.hooks
        if func is F.scaled_dot_product_attention:
            q, k, _, mask, _, causal, scale, gqa = _bind(args, kwargs, _SDPA, _SDPA_DEFAULTS)
            hooks.fused(q, k, lambda: score_stats(sdpa_scores(q, k, mask, bool(causal), scale, bool(gqa))))  # type: ignore[arg-type]
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:  # one torch function for the whole attention: nothing inside it
            found = mha_qk(args, kwargs)  # is seen, so its q and k are projected again
            if found is not None:
                q, k, keep = found
                hooks.fused(q, k, lambda: score_stats(sdpa_scores(q, k, keep)))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            softmax, product = func in _SOFTMAX, func in _PRODUCTS
        except TypeError:  # an unhashable callable is neither
            return out
        if softmax:
            x, dim = _bind(args, kwargs, ("input", "dim"), (None, None))
            if isinstance(x, Tensor) and x.dim() == 4 and dim in (-1, 3) and isinstance(out, Tensor):
                hooks.softmax(x, out)
        elif product and len(args) >= 2 and isinstance(out, Tensor) and out.dim() >= 3:
            hooks.product(args[0], args[1], out)
        elif func is torch.baddbmm and len(args) >= 3 and isinstance(out, Tensor):
            hooks.product(args[1], args[2], out)
        return out
