"""D1 and D2 under Lightning: when to measure the activation layers (the meter says how)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_netdiag import stats
from lightning_netdiag.callbacks._common import DiagnosticCallback
from lightning_netdiag.meters import ActivationMeter

__all__ = ["SaturationMonitor"]


class SaturationMonitor(ActivationMeter, DiagnosticCallback):
    r"""Watches the activation layers: how saturated they are (D1) and what gradient reaches them (D2).

    Every activation that runs is watched by default: ``torch.nn`` activation modules, any other
    parameter-free elementwise module (transformers' and timm's activation classes, a user's ``Swish``:
    probed once and matched against the known kinds, see ``lightning_netdiag.activations``), and functional
    calls in ``forward`` (``F.relu``, ``torch.tanh``, ``x.relu_()``, ...) named by the module whose forward
    made them (``layer1.0/relu``). Each call of a module in one forward is a layer of its own
    (``layer1.0.relu``, ``layer1.0.relu-2``); calls from ``max_calls`` on share the last one.

    A forward hook on each watched module (on logging steps, a ``TorchFunctionMode`` for functional calls)
    reads its output; a tensor hook on that output reads its gradient. They run only on logging steps and
    only add on-device counts; the records of every micro-batch of the step (gradient accumulation) and,
    under DDP, of every rank are summed, then moved to the host once, just before the optimizer step. A
    forward recomputed during the backward (activation checkpointing) is not recorded again.

    Saturation is "in the flat region where the derivative is about 0", per activation kind:

    - Tanh, Softsign: ``|t| > threshold`` (the lecture's 0.97); Sigmoid: ``t < 1 - threshold or t > threshold``;
    - Hardtanh, ReLU6, Hardsigmoid: at or beyond their clamp bounds; Hardshrink, Softshrink: ``t == 0``;
    - ReLU, ReLU², a LeakyReLU of slope up to 0.03 (its default 0.01): ``t <= 0``; a steeper leaky side (GANs'
      LeakyReLU(0.2), PReLU, RReLU) is no flat region: no saturation, no dead units;
    - ELU, CELU: ``t < -threshold * alpha``; SELU: ``t < -threshold * scale * alpha`` (near the asymptote);
    - Softplus: ``t < -ln(threshold) / beta``; LogSigmoid: ``t > ln(threshold)`` (derivative below 1 - threshold);
    - GELU (exact and tanh), QuickGELU, Hardswish: input ``x < -3``; SiLU, Mish: input ``x < -5``
      (derivative below about 0.03).

    A unit (a feature along ``unit_dim``) is dead when it is saturated for every example of the step.

    Args:
        modules: what to watch: module types (``isinstance``) and glob patterns on qualified module names
            (``"blocks.*.act"``); a functional call is watched if its owner or its own name matches. None
            watches every activation. A module without a known kind gets mean, std and histograms, but no
            saturation.
        exclude: module types and name globs never watched (nor the functional calls of matching owners).
        threshold: the saturation threshold of the smoothly bounded kinds, in (0, 1).
        track_grad: also record the gradient of each watched output (D2).
        unit_dim: the dimension of an activation that indexes units; None: the channels (dim 1) of 4-D and
            5-D outputs (N, C, H, W), the last dim otherwise (Linear and sequence layers). Pass 1 for a
            Conv1d's (N, C, L) outputs, -1 for channels-last (N, H, W, C) ones.
        functional: also watch functional activation calls (not under torch.compile: there they would break
            the graph, and a warning says so).
        max_calls: the calls of one module (or one function from one owner) per forward that get a layer of
            their own; the later ones are pooled into the last.
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        histograms: log histograms (TensorBoard) or their quantiles (loggers without histograms).
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range or a selection holds something other than module
            types and strings.

    Example::

        from lightning import Trainer
        from lightning_netdiag import SaturationMonitor

        trainer = Trainer(callbacks=[SaturationMonitor(every_n_steps=10)])

    **Logged metrics**, per watched layer ``{name}`` (its qualified module name, ``-k`` for its k-th call in
    a forward, ``{owner}/{function}`` for a functional call), at the step being measured:

    - ``{prefix}/act_mean/{name}``, ``{prefix}/act_std/{name}``: mean and (unbiased) std of the output;
    - ``{prefix}/act_saturated_pct/{name}``: % of output values in the saturated region;
    - ``{prefix}/act_dead_pct/{name}``: % of units saturated for every example of the step;
    - ``{prefix}/act_nonfinite/{name}``: number of NaN/Inf output values (left out of everything else);
    - ``{prefix}/act/{name}``: histogram of the output;
    - with ``track_grad``: ``{prefix}/act_grad_mean/{name}``, ``{prefix}/act_grad_std/{name}``,
      ``{prefix}/act_grad_nonfinite/{name}`` and the histogram ``{prefix}/act_grad/{name}``, of the gradient
      of the loss with respect to the output: unscaled under AMP, and under data parallelism that of the
      global-batch loss; where that gradient is computed in fp16, ``{prefix}/act_grad_fp16_tiny_pct/{name}``:
      % of its values (as computed: loss-scaled under a GradScaler) that are non-zero and below fp16's
      smallest normal value, 2**-14 (they lose precision, and below 2**-24 they become 0).

    At step 0 only (the network at initialisation; with ``modules=None``, not under torch.compile), of the
    model's output, the last tensor a module with parameters of its own made in the forward (``{out}`` is that
    module's name), read as logits: ``{prefix}/init_output_ce/{out}``, the cross-entropy of the output against
    uniformly random labels (``ln(classes)`` for a uniform output); ``{prefix}/init_output_classes/{out}``, its
    last dimension (dim 1 of a 4-D output); ``{prefix}/init_loss``, the loss that the step's backward started
    from (unscaled, not divided for accumulation).

    At each logging step: ``{prefix}/loss_median``, the median of the training losses of the last
    ``every_n_steps`` steps, this one's included (each step's the mean of its micro-batches', unscaled; over the
    ranks, their mean): the report's diverged loss. Between logging steps each loss is held, not read (no kernel).

    Loggers without histograms get ``.../q05``, ``.../q50``, ``.../q95`` of each histogram instead.
    """

    def __init__(
        self,
        modules: Sequence[type | str] | None = None,
        exclude: Sequence[type | str] = (),
        threshold: float = stats.DEFAULT_THRESHOLD,
        track_grad: bool = True,
        unit_dim: int | None = None,
        functional: bool = True,
        max_calls: int = 16,
        every_n_steps: int | None = None,
        histograms: bool = True,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        ActivationMeter.__init__(
            self, modules, exclude, threshold, track_grad, unit_dim, functional, max_calls, histograms, prefix,
            history_size,
        )  # fmt: skip
        self._cadence(every_n_steps)
