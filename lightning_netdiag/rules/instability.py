"""The instability rules: attention logits growing (Wortsman et al. 2023) or the attentions' entropy collapsing (Zhai
et al. 2023), and Adam's eps dominating the step. Calibration: ``docs/diagnosis.md#instability``."""

from __future__ import annotations

import math
import statistics

from lightning_netdiag.rules.base import Found, Records, Rule, at, median, steps_of

__all__ = [
    "ADAM_EPS_PCT", "ATTN_ENTROPY_FALL", "ATTN_ENTROPY_LOW", "ATTN_LOGIT_AT_ONCE", "ATTN_LOGIT_HIGH", "RULES",
    "adam_eps_at", "attention_entropy_at", "attention_logits_at", "collapsed_attentions_at", "fallen_entropy_at",
    "has_warmup", "logit_notes",
]  # fmt: skip

#: The largest pre-softmax attention logit (the largest over the attentions, held over PERSIST logging steps)
#: above which an attention is collapsing toward a one-hot softmax (attention-logit growth).
ATTN_LOGIT_HIGH = 200.0
ATTN_LOGIT_AT_ONCE = 5 * ATTN_LOGIT_HIGH  # the largest attention logit above which one logging step is enough
#: The median over the attentions of their softmax's mean normalised entropy (1: uniform, 0: one-hot; held over
#: PERSIST logging steps) below which, fallen below ATTN_ENTROPY_FALL times its first logged value, the softmaxes
#: have collapsed toward one-hot (entropy collapse): the failure attention-logit growth leads to, seen where the
#: logits' spread, not their largest value, grew.
ATTN_ENTROPY_LOW = 0.15
#: A median entropy that has not fallen to half its first value is how the attentions started (pretrained, or
#: local by design): not a collapse.
ATTN_ENTROPY_FALL = 0.5
#: Adam family: % of a weight's elements with ``sqrt(v_hat) < eps`` (median over the weights) above which eps,
#: not the gradient, sets the step: Adam turns into a slowed SGD.
ADAM_EPS_PCT = 50.0


def attention_logits_at(records: Records, step: int) -> dict[str, float]:
    """name -> the largest pre-softmax logit of each watched attention at ``step`` (inf where it was not finite:
    overflowed, or NaN)."""
    logits = records.get("logits")
    return {**at(logits, "attn_logit_max", step), **dict.fromkeys(at(logits, "attn_logit_nonfinite", step), math.inf)}


def has_warmup(records: Records) -> bool:
    """Whether the learning rate rose after step 0 (a warm-up), as far as the logged rates tell."""
    update = records.get("update")
    lrs = [] if update is None else [v for _, v in update.points("lr")]
    return len(lrs) > 1 and lrs[0] < 0.5 * max(lrs)


def attention_entropy_at(records: Records, step: int) -> tuple[float, float] | None:
    """The median over the attentions of their softmax's mean normalised entropy at ``step``, and the same at the
    first logged step (see :data:`ATTN_ENTROPY_LOW`); None where it was not read."""
    logits = records.get("logits")
    now = at(logits, "attn_entropy", step)
    if logits is None or not now:
        return None
    first = [points[0][1] for points in logits.first("attn_entropy", 1).values() if points]
    return statistics.median(now.values()), statistics.median(first)


def fallen_entropy_at(records: Records, step: int) -> float | None:
    """The median over the attentions of their mean normalised entropy at ``step`` where it has fallen below
    :data:`ATTN_ENTROPY_FALL` times its first logged value; None elsewhere (or where it was not read)."""
    found = attention_entropy_at(records, step)
    return found[0] if found is not None and found[0] < ATTN_ENTROPY_FALL * found[1] else None


def collapsed_attentions_at(records: Records, step: int, line: float = ATTN_ENTROPY_LOW) -> dict[str, float]:
    """name -> the mean normalised entropy of each attention below ``line`` at ``step``, where the median over the
    attentions has fallen (:func:`fallen_entropy_at`) below it (most softmaxes have collapsed toward one-hot);
    empty elsewhere."""
    fallen = fallen_entropy_at(records, step)
    if fallen is None or fallen >= line:
        return {}
    return {name: v for name, v in at(records.get("logits"), "attn_entropy", step).items() if v < line}


def _fixes(found: Found) -> str:
    fixes = ["lower the learning rate"]
    if not has_warmup(found.records):
        fixes.append("add a warm-up")
    if not set(found.hits) <= found.records["logits"].qk_norm:
        fixes.append("normalise q and k (qk-layernorm)")
    return ", ".join(fixes[:-1]) + f" or {fixes[-1]}" if len(fixes) > 1 else fixes[0]


def _ending(found: Found) -> str:
    saturation = found.records.get("saturation")
    fp16 = saturation is not None and bool(saturation.names("act_grad_fp16_tiny_pct"))  # only logged in fp16
    overflow = " (in fp16, logits above 65504 overflow to inf)" if fp16 else ""
    return f"; runs like this end worse or diverge{overflow}. Typical of a learning rate too high for the model"


def _grown(found: Found) -> str:
    hits, step = found.hits, found.step
    worst = max(hits, key=hits.__getitem__)
    init = found.records["logits"].at_init("attn_logit_max").get(worst)
    since = f" ({init:.2g} at init)" if init is not None else ""
    return (f"the largest pre-softmax logit in {worst} is {hits[worst]:.3g} at step {step}{since}: its softmax is "
            f"close to one-hot and passes little gradient{_ending(found)}")  # fmt: skip


def _collapsed(found: Found) -> str:
    hits, step = found.hits, found.step
    median_now, first = attention_entropy_at(found.records, step) or (math.nan, math.nan)
    worst = min(hits, key=hits.__getitem__)
    return ("the softmaxes are close to one-hot and pass little gradient: the median over the attentions of their "
            f"mean normalised entropy (1 uniform, 0 one-hot) is {median_now:.2f} at step {step} ({first:.2f} at "
            f"first), {hits[worst]:.2f} in {worst} (their logits grew apart){_ending(found)}")  # fmt: skip


def adam_eps_at(records: Records, step: int) -> dict[str, float]:
    """name -> % of the weight's elements where Adam's eps exceeds sqrt(v_hat), at ``step``."""
    return at(records.get("optimizer"), "adam_eps_pct", step)


def _eps_flag(records: Records, step: int, line: float) -> dict[str, float]:
    pct = adam_eps_at(records, step)
    return {n: v for n, v in pct.items() if v > line} if pct and statistics.median(pct.values()) > line else {}


def _eps_text(found: Found) -> str:
    eps = found.records["optimizer"].eps
    if eps is None:
        return "eps, not the gradient, sets the step"
    return (f"in most elements the gradient's RMS is below Adam's eps ({eps:g}): eps, not the gradient, sets the "
            "step, so Adam moves them like a slow SGD")  # fmt: skip


_GROWING = "attention logits growing"

RULES: tuple[Rule, ...] = (
    # Either attention rule must hold over the steps (the attention that holds it may change); named: those that
    # break it now.
    Rule(
        id="instability.attention_logits",
        check=_GROWING,
        reads=("logits",),
        when="training",
        line=ATTN_LOGIT_HIGH,
        above=True,
        at_once=ATTN_LOGIT_AT_ONCE,
        over="largest of the attentions",
        signal=lambda records, step: max(attention_logits_at(records, step).values(), default=None),
        signal_name="largest attention logit",
        constant="ATTN_LOGIT_HIGH",
        at_once_constant="ATTN_LOGIT_AT_ONCE",
        named=lambda f: {n: v for n, v in attention_logits_at(f.records, f.step).items() if v > ATTN_LOGIT_HIGH},
        healthy=f"largest attention logit < {ATTN_LOGIT_HIGH:g}",
        cause=_grown,
        advice=_fixes,
        section="instability",
    ),  # fmt: skip
    Rule(
        id="instability.attention_entropy",
        check=_GROWING,
        reads=("logits",),
        when="training",
        line=ATTN_ENTROPY_LOW,
        above=False,
        flag=lambda records, step, line: (
            {"median of the attentions": 0.0} if collapsed_attentions_at(records, step, line) else {}
        ),
        signal=fallen_entropy_at,
        signal_name="attention entropy, median (fallen)",
        constant="ATTN_ENTROPY_LOW",
        named=lambda f: collapsed_attentions_at(f.records, f.step),
        healthy=f"entropy > {ATTN_ENTROPY_LOW:g} (or above {ATTN_ENTROPY_FALL:g}x its first) in half the attentions",
        cause=_collapsed,
        advice=_fixes,
        yields_to=("instability.attention_logits",),
        section="instability",
    ),  # fmt: skip
    Rule(
        id="instability.adam_eps",
        check="Adam epsilon dominating",
        reads=("optimizer",),
        when="training",
        line=ADAM_EPS_PCT,
        above=True,
        flag=_eps_flag,
        signal=lambda records, step: median(adam_eps_at(records, step)) if step > 0 else None,
        signal_name="Adam eps %, median",
        constant="ADAM_EPS_PCT",
        healthy=f"Adam: median over the weights < {ADAM_EPS_PCT:g} % of elements with sqrt(v) < eps",
        cause=_eps_text,
        advice="lower eps (the default is 1e-8), or scale the loss up",
        section="instability",
    ),
)


def logit_notes(records: Records) -> list[str]:
    """What the attention rules read at the latest step, said even when they find nothing; the output's logits (not
    judged: the suites hold no run where they drift); and the attentions they could not watch."""
    logits = records.get("logits")
    if logits is None:
        return []
    steps = steps_of(logits)
    notes = []
    if steps and (found := attention_logits_at(records, steps[-1])):
        worst = max(found, key=found.__getitem__)
        notes.append(f"attention logits: largest {found[worst]:.3g} ({worst}) at step {steps[-1]}, too high above "
                     f"{ATTN_LOGIT_HIGH:g}")  # fmt: skip
    if steps and (found_entropy := attention_entropy_at(records, steps[-1])):
        entropies = at(logits, "attn_entropy", steps[-1])
        low = min(entropies, key=entropies.__getitem__)
        line = f"attention entropy: median over the attentions {found_entropy[0]:.2f} at step {steps[-1]} "
        line += f"({found_entropy[1]:.2f} at first), smallest {entropies[low]:.2f} ({low}); collapsed where the median "
        line += f"is below {ATTN_ENTROPY_LOW:g} and {ATTN_ENTROPY_FALL:g}x its first"
        notes.append(line)
    out = logits.output
    log_z, top = (at(logits, m, steps[-1]).get(out or "") for m in ("output_logz", "output_logit_max")) if steps else (
        None, None)  # fmt: skip
    if log_z is not None and top is not None:
        init = logits.at_init("output_logz").get(out or "")
        since = "" if init is None else f" ({init:.3g} at init)"
        notes.append(f"output logits: mean log Z {log_z:.3g}{since}, largest {top:.3g} at step {steps[-1]}, not judged")
    if logits.unwatched:
        notes.append(
            f"attention not watched in {', '.join(sorted(logits.unwatched))}: it runs in a kernel netdiag cannot see "
            "(flash-attn, xformers, a custom op), so the attention check says nothing about it"
        )
    return notes
