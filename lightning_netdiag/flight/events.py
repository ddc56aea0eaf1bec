"""The flight recorder's events, typed: what happened at which step, where it began, and each in words. An event is
a JSON object in the record (``FlightRecord.events``) and in the window's file, so it is a ``TypedDict``: the same
dict on disk, in the record and here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from typing_extensions import NotRequired

from lightning_netdiag.origin import FLOAT16_MAX, INPUTS, Made, Replayed
from lightning_netdiag.spikes import LOOKBACK

__all__ = [
    "AFTER", "CAUSES", "JOINED", "RATE_JUMP", "STOPS", "Batch", "Began", "Event", "Rate", "Rose", "event_text",
    "guarded_text", "live_text", "named", "named_first", "rate_text", "rose_text", "step_causes", "stopped",
]  # fmt: skip

#: The causes of a step's event, in the order of the bits of its verdict; the first set names it (the others are
#: said with it). An exception (or a stop) that ends training is an event of its own, ``"exception"``.
CAUSES = ("non-finite loss", "non-finite gradients", "loss spike", "gradient spike", "weight spike")
# How a run stopped from outside ends (Ctrl-C; a scheduler's or launcher's SIGTERM, which Lightning raises as
# SIGTERMException): stopped, not broken.
STOPS = ("KeyboardInterrupt", "SIGTERM", "SIGTERMException")
AFTER = 4  # the steps after a spike watched for its loss to come back under its spike line
JOINED = 16  # the steps after parameters begin training (unfrozen) in which a spike is no event
RATE_JUMP = 1.5  # a parameter group's rate that rises by this factor from one step to the next has jumped


def step_causes(
    nonfinite: Sequence[bool], over: Sequence[bool], seen: bool, scaled: bool, weights: bool = False
) -> list[str]:
    """The causes of a step's event, in :data:`CAUSES`' order (none: no event), from its verdict: ``nonfinite``, the
    loss and the total gradient norm not finite; ``over``, each over its spike line; ``seen``, a loss was seen (none:
    its loss is not judged); ``scaled``, a loss scaler is on (it skips the steps whose gradients overflow: no event);
    ``weights``, a weight's update or norm over its line. The one test of an event: on the device's verdict after the
    step and on the host's values before it (the guard, the replay), which do not know the update yet."""
    bits = (
        nonfinite[0] and seen,
        nonfinite[1] and not scaled,
        over[0] and not nonfinite[0],  # a non-finite value is over its line too: said once, as non-finite
        over[1] and not nonfinite[1],
        weights,
    )
    return [cause for cause, bit in zip(CAUSES, bits, strict=True) if bit]


class Began(TypedDict):
    """A series that left its band before an event: the weight, which of its series, the step it left, its score
    there (its name where not finite)."""

    name: str
    series: str
    step: int
    score: float | str


class Rose(TypedDict):
    """How many of the ``of`` watched weights had their gradient norm, and their update norm, out of their band (above
    it) at the event's step: all of them together is a batch's mark, one or a few a weight's."""

    gradient: int
    update: int
    of: int


#: The learning rate at the event's step against the step before, where a parameter group's rate rose by
#: :data:`RATE_JUMP` or more: the largest rise (``from``, ``to``) and how many of the ``of`` groups rose so.
Rate = TypedDict("Rate", {"from": float, "to": float, "groups": int, "of": int})


class Batch(TypedDict, total=False):
    """The batch of an event's step: its fingerprint (``flight_batch``), the bytes of its inputs kept on the host and
    whether a tensor was cut to fit (``keep_batch``), what identified its micro-batches (``index``: Lightning's epoch
    and batch index, the ids the user told), and the file beside the logs that holds it (``tags.batch_file``)."""

    fingerprint: float
    bytes: int
    cut: bool
    index: list[dict[str, Any]]
    file: str


class Event(TypedDict):
    """One event: its step and cause (:data:`CAUSES` or ``"exception"``); the other causes of the same step
    (``also``); what ended the run (``error``); where its non-finite values were made (``made``); the step's loss and
    total gradient norm; the series that left their band first (``began``) and by how many steps they led the event
    (``lead``); what the device raised when it could not be read after an error (``unread``). The evidence of why: the
    median loss of the steps before (``loss_median``), how many weights rose with it (``rose``), a rise of the learning
    rate at its step (``rate``), the first step after it whose loss was back under its spike line (``back``; None:
    not within :data:`AFTER` steps), its batch (``batch``), whether its forward, run again on the same batch, weights
    and random state, gave the same output (``replayed``). Whether the guard skipped its step (``skipped``)."""

    step: int
    cause: str
    also: NotRequired[list[str]]
    error: NotRequired[str]
    made: NotRequired[Made]
    loss: NotRequired[float | str]
    grad_total: NotRequired[float | str]
    began: NotRequired[list[Began]]
    lead: NotRequired[int]
    unread: NotRequired[str]
    loss_median: NotRequired[float | str]
    rose: NotRequired[Rose]
    rate: NotRequired[Rate]
    back: NotRequired[int | None]
    batch: NotRequired[Batch]
    skipped: NotRequired[bool]
    replayed: NotRequired[Replayed]


def named(event: Event) -> list[str]:
    """What an event names, first things first, each once: the module whose forward made its non-finite values
    (where the step was replayed), then the weights whose series left their band, the first to leave first."""
    made = event["made"].get("module") if "made" in event else None
    return list(dict.fromkeys([*([made] if made else []), *(b["name"] for b in event.get("began") or [])]))


def named_first(event: Event) -> str | None:
    """The first of :func:`named`; None if the event names nothing."""
    return next(iter(named(event)), None)


def stopped(event: Event) -> bool:
    """Whether an event is the end of a run stopped from outside (:data:`STOPS`)."""
    return event["cause"] == "exception" and event.get("error", "").split(":")[0] in STOPS


def guarded_text(event: Event) -> str:
    """What the guard did at an event's step, to follow its text: nothing said where it did not skip it."""
    if not event.get("skipped"):
        return ""
    return "; not applied: the guard skipped the step (the weights and the optimizer's state as before it)"


def _made_text(made: Made) -> str:
    if made.get("module") and "overflow" in made:
        return (
            f"made in the forward of {made['module']}: its float16 output overflowed (run again in float32 from "
            f"the same inputs it is finite, up to {made['overflow']:.3g}; float16 holds {FLOAT16_MAX:,.0f})"
        )
    if made.get("module"):
        return f"made in the forward of {made['module']} (the first module whose output was not finite)"
    if made.get("in") == INPUTS:
        return "the inputs of the step's forward were not finite"
    return "the step's forward, replayed, stayed finite: they were made in the backward"


def event_text(event: Event) -> str:
    """An event in words: what happened at which step and, where known, the series that left their band first and by
    how many steps they led."""
    ended = event["cause"] == "exception"
    causes = " and ".join([event["cause"], *event.get("also", [])])
    step = event["step"]
    # an exception is recorded at the last step completed: it may have been raised in the next one
    how = "stopped" if stopped(event) else "ended"
    text = f"training {how} after step {step} ({event.get('error', '')})" if ended else f"{causes} at step {step}"
    if event.get("unread"):  # the device could not be read after the error: no window, no band
        return f"{text}: the device could not be read after it ({event['unread']}); the steps kept end at the last save"
    if event.get("made"):
        return f"{text}: {_made_text(event['made'])}"
    began = event.get("began") or []
    if began:
        first = began[0]
        lead = event["step"] - first["step"]
        since = f"step {first['step']}" + (" or before" if lead >= LOOKBACK else "")
        if ended:
            return f"{text}: out of its band at the end, first: {first['name']} (its {first['series']}, since {since})"
        what = "loss" if "loss" in causes else "total gradient norm" if "gradient" in causes else "event"
        led = f"{lead} step{'s' if lead != 1 else ''} before the {what}" if lead else "at that step"
        text += f": began in {first['name']} (its {first['series']} left its band at {since}, {led})"
    elif ended and "began" in event:  # the window was searched and nothing had left its band
        text += ": every watched series was within its band"
    return text


def rose_text(event: Event) -> str:
    """How many weights' gradients and updates left their band with the event ("" where not known)."""
    rose = event.get("rose")
    if rose is None:
        return ""
    return f"{rose['gradient']} of {rose['of']} weights' gradients and {rose['update']} of their updates rose with it"


def rate_text(event: Event) -> str:
    """The rise of the learning rate at the event's step (it must have one: ``"rate"``)."""
    rate = event["rate"]
    groups = "every parameter group" if rate["groups"] == rate["of"] else f"{rate['groups']} of {rate['of']} groups"
    return f"the learning rate went from {rate['from']:.3g} to {rate['to']:.3g} at step {event['step']} ({groups})"


def live_text(event: Event) -> str:
    """An event as the recorder says it when it happens: :func:`event_text`, then the evidence of its cause known at
    that step (a rise of the learning rate, how many weights rose with it). Whether its loss comes back, and so the
    cause the report gives it, is known only at the next steps."""
    return "; ".join(x for x in (event_text(event), rate_text(event) if "rate" in event else "", rose_text(event)) if x)
