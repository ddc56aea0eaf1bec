"""Attention and output logits under Lightning: when to measure them (the meter says how)."""

from __future__ import annotations

from lightning_netdiag.callbacks._common import DiagnosticCallback
from lightning_netdiag.meters import LogitMeter

__all__ = ["LogitMonitor"]


class LogitMonitor(LogitMeter, DiagnosticCallback):
    r"""Watches the logits that softmaxes see: every attention's, and the model's output.

    Attention logits that grow until the softmax is one-hot, and output logits that drift, are how transformer
    runs trained too fast go unstable (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
    training instabilities"); the health report judges both.

    Every attention call is watched, with no argument: an eager one (a softmax over a 4-D score tensor, as in
    transformers' ``eager`` attention, timm, nanoGPT, a hand-written model; or ``nn.MultiheadAttention``'s) and a
    fused one (``F.scaled_dot_product_attention``, with its ``attn_mask``, ``is_causal``, ``scale`` and
    grouped-query heads), each named by the module whose forward made it. A fused call's scores are computed
    again, exactly, a block of queries at a time: at most 2**22 scores at once (16 MiB), about one ``q @ k.T``
    more per attention on a measured step. An attention module (class named ``*Attention*`` or ``*Attn*``) that
    runs without such a call (flash-attn, xformers, a custom kernel) is listed in the record as unwatched and
    the report says so. Nothing is watched under torch.compile (a warning says so).

    Args:
        max_calls: the attention calls of one module per forward that get a name of their own; the later ones
            are pooled into the last.
        every_n_steps: measure every n-th optimizer step; None takes ``trainer.log_every_n_steps``.
        prefix: the first part of every tag.
        history_size: the number of points kept in ``history`` per tag.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        from lightning import Trainer
        from lightning_netdiag import HealthReport, LogitMonitor

        trainer = Trainer(callbacks=[LogitMonitor(), HealthReport()])

    **Logged metrics**, at each measured step, over every micro-batch of the step (and every rank):

    - ``{prefix}/attn_logit_max/{name}``: the largest pre-softmax logit of attention ``{name}`` (its scale
      applied, masked positions excluded); where it is not finite (fp16 overflow, NaN),
      ``{prefix}/attn_logit_nonfinite/{name}`` = 1 instead;
    - ``{prefix}/attn_entropy/{name}``: the mean over its softmax's rows of their entropy divided by the log of
      the keys each row attends to (masked keys excluded; rows with one key left out): 1 for a uniform softmax,
      0 for a one-hot one;
    - ``{prefix}/attn_q_rms/{name}``, ``{prefix}/attn_k_rms/{name}``: the RMS of its q and k as they enter
      the product (eager: the operands of the product that made the scores; fused: the call's q and k);
    - ``{prefix}/output_logz/{out}``: the mean over the output's rows of ``logsumexp(z)`` (log Z), and
      ``{prefix}/output_logit_max/{out}``: its largest logit; ``{out}`` is the module that made the output (the
      last tensor a module with parameters of its own made in the forward: the LM head, the classifier).
    """

    def __init__(
        self,
        max_calls: int = 16,
        every_n_steps: int | None = None,
        prefix: str = "netdiag",
        history_size: int = 10_000,
    ) -> None:
        LogitMeter.__init__(self, max_calls, prefix, history_size)
        self._cadence(every_n_steps)
