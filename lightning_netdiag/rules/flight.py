"""The flight recorder's events as verdicts. Events are facts, not rules: the recorder decided them while the run
went on, at every step, against bands (:mod:`lightning_netdiag.spikes`), so they are said as they were, never
replayed. A spike's cause is decided from the evidence its event holds, by the first of :data:`SPIKE_CAUSES` that
holds. Calibration: ``docs/diagnosis.md#the-flight-recorder``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from lightning_netdiag import spikes
from lightning_netdiag.flight.events import (
    AFTER,
    JOINED,
    Event,
    event_text,
    guarded_text,
    named,
    rate_text,
    rose_text,
    stopped,
)
from lightning_netdiag.record import FlightRecord
from lightning_netdiag.rules.base import WORST, Verdict

__all__ = [
    "INSTABILITY", "SPIKE_CAUSES", "TOGETHER", "Cause", "after_instability", "cause_of", "event_verdicts",
    "flight_notes",
]  # fmt: skip

#: The share of the watched weights whose gradient norms must leave their band with a spike for the spike to be
#: the batch's (the loss, not a layer, the outlier), unless the loss left its band and no weight's own change did:
#: where one weight goes first, the others follow later.
TOGETHER = 2 / 3


@dataclass(frozen=True)
class Cause:
    """Why a spike happened: ``holds`` on the event's evidence, said by ``text``, with ``advice``; ``names_weights``:
    whether the verdict names the weights that left their band (a batch or a rate names none: no layer is at fault)."""

    id: str
    holds: Callable[[Event], bool]
    text: Callable[[Event], str]
    advice: str
    names_weights: bool


def _causes(event: Event) -> str:
    return " and ".join([event["cause"], *event.get("also", [])])


def _times_median(event: Event) -> str:
    loss, median = event.get("loss"), event.get("loss_median")
    if not isinstance(loss, float) or not isinstance(median, float) or median <= 0:
        return ""
    return f", {loss / median:.2g}x its median"


def _together(event: Event) -> bool:
    rose = event.get("rose")
    return rose is not None and rose["of"] > 0 and rose["gradient"] >= TOGETHER * rose["of"]


def _gradients_only(event: Event) -> bool:
    """No weight's own change (its update, its norm) is among the series out of their band: at most gradients rose,
    as a batch moves them (a rate or a weight moves its updates or its norm)."""
    return all(b["series"] == "gradient norm" for b in event.get("began") or [])


def _loss_out(event: Event) -> bool:
    """The step's loss itself left its band (a loss spike, alone or with the gradients): the batch made an outlier of
    it. A gradient spike whose loss stayed in band, with no weight's gradients rising together, is no batch's shown."""
    return "loss spike" in (event["cause"], *event.get("also", []))


def _own_norm(event: Event) -> bool:
    """The first series out of its band is a weight's own norm: a step's updates barely move a norm, a batch's or a
    rate's no more than the rest: a norm that leaves its band changed by itself."""
    began = event.get("began") or []
    return bool(began) and began[0]["series"] == "weight norm"


def _lone_update(event: Event) -> bool:
    """The first series out of its band is a weight's update while the updates did not all move together (as a
    rate's jump moves them; a batch moves the gradients together, the updates not under Adam, which divides each by
    its own scale)."""
    began, rose = event.get("began") or [], event.get("rose")
    if not began or rose is None:
        return False
    return began[0]["series"] == "update norm" and rose["update"] < TOGETHER * rose["of"]


def _back(event: Event) -> str:
    back = event.get("back")
    return f"back in band at {back}" if back is not None else f"not back in band within {AFTER} steps"


def _weight_text(event: Event) -> str:
    rate = f"; {rate_text(event)}" if "rate" in event else ""
    return f"{event_text(event)}{rate}"


def _kept(event: Event) -> str:
    """Where the event's batch is kept, and how to print it."""
    file = event.get("batch", {}).get("file")
    return f"; the batch is kept beside the logs ({file}: netdiag batch RUN --step {event['step']})" if file else ""


def _batch_text(event: Event) -> str:
    step = event["step"]
    loss = event.get("loss")
    said = f"loss {loss:.3g}" if isinstance(loss, float) else f"loss {loss}"
    return (
        f"{_causes(event)} at step {step}: the batch of step {step} ({said}{_times_median(event)}; {_back(event)}; "
        f"{rose_text(event)}){_kept(event)}"
    )


def _unclear_text(event: Event) -> str:
    seen = "; ".join(x for x in (rose_text(event), _back(event) if "back" in event else "") if x)
    return f"{_causes(event)} at step {event['step']}: cause unclear" + (f" ({seen})" if seen else "") + _kept(event)


_LOSS_OR_GRADIENT = ("loss spike", "gradient spike")
_WEIGHT_ADVICE = (
    "look at the first weights named, at that step: lower their learning rate (a parameter group of their own) or the "
    "rate overall, clip gradients; the full measurement of the next step is in the other checks"
)


def _not_reproduced_text(event: Event) -> str:
    replayed = event["replayed"]
    return (
        f"{_causes(event)} at step {event['step']}: not reproducible: the step's forward, run again on its batch with "
        f"the same weights and random state, gave a different output (its sum {replayed['first']:.7g}, then "
        f"{replayed['again']:.7g}): non-determinism or a fault of the hardware, not the data nor the model"
        f"{_kept(event)}"
    )


#: A spike's causes, in the order they are tried: the first that holds is said.
SPIKE_CAUSES: tuple[Cause, ...] = (
    Cause(
        "not_reproducible", lambda e: "replayed" in e and not e["replayed"]["same"], _not_reproduced_text,
        "a spike that does not come back from the same inputs: look at the device (nvidia-smi -q: ECC errors, "
        "clocks, another GPU) and at non-deterministic kernels (torch.use_deterministic_algorithms(True) tells them "
        "apart); skipping such a step (FlightRecorder(guard=...)) is safe", False,
    ),
    Cause(
        "learning_rate", lambda e: "rate" in e and e["rate"]["groups"] == e["rate"]["of"],
        lambda e: f"{_causes(e)} at step {e['step']}: {rate_text(e)}" + (f"; {rose_text(e)}" if "rose" in e else ""),
        "check the schedule (or a resumed optimizer's state): the rate jumped at that step; bring it back, or warm up "
        "to it", False,
    ),
    Cause(
        "weight", lambda e: bool(e.get("began")) and e.get("lead", 0) > 0, _weight_text, _WEIGHT_ADVICE, True,
    ),
    Cause("weight", _own_norm, _weight_text, _WEIGHT_ADVICE, True),
    Cause(
        "batch", lambda e: e["cause"] in _LOSS_OR_GRADIENT and (_together(e) or _gradients_only(e) and _loss_out(e))
        and e.get("back") is not None,
        _batch_text, "look at the batch of that step (its inputs and labels): corrupted, mislabelled or out of "
        "distribution; skip it, or clean the data it came from", False,
    ),
    Cause("weight", _lone_update, _weight_text, _WEIGHT_ADVICE, True),
    Cause("weight", lambda e: bool(e.get("began")) and not _together(e), _weight_text, _WEIGHT_ADVICE, True),
    Cause(
        "unclear", lambda e: True, _unclear_text, "look at the steps around it (netdiag plots draws them) and at the "
        "batch of that step; if it comes back, lower the learning rate or clip gradients", False,
    ),
)  # fmt: skip


def cause_of(event: Event) -> Cause:
    """The cause of a spike: the first of :data:`SPIKE_CAUSES` whose evidence holds."""
    return next(cause for cause in SPIKE_CAUSES if cause.holds(event))


_EVENT_ADVICE = {
    "non-finite": "the module or weights named first went first: look for a log(0), a division by zero or an "
                  "overflow there (fp16 without a loss scaler); lower the learning rate, clip gradients",
    "overflow": "train in bfloat16 (float32's range) or keep the module named in float32 (autocast off there); a "
                "loss scaler does not help a forward's overflow; if its values grew with training, lower the learning "
                "rate or add a normalisation before it",
    "exception": "the last steps before the end are in the logs (netdiag plots draws them); the weights named were "
                 "out of their band when it ended",
    "calm end": "the last steps before the end are in the logs; no watched series was out of its band when it "
                "ended, so the error, not the training's numbers, is where to look",
    "unread": "the error left the device unreadable (on a GPU, a CUDA error: run again with CUDA_LAUNCH_BLOCKING=1 "
              "to see which kernel failed); the steps kept end at the last save of the window (save_interval)",
    "stopped": "the last steps before the stop are in the logs (netdiag plots draws them); the weights named were "
                 "out of their band when it was stopped",
}  # fmt: skip


def event_verdicts(flight: FlightRecord | None) -> list[Verdict]:
    """One verdict per event of the flight recorder: the step, and where it began (the module whose forward made the
    non-finite values, where the step was replayed; the series that left their band first). A spike is a warning, a
    non-finite loss or gradient fatal; the end by an exception is said as it was. A run stopped from outside (Ctrl-C,
    SIGTERM) is no fault: a warning where a series was out of its band then, else only a note. Only the events up to the
    record's latest step (as the report replays a run)."""
    if flight is None or flight.last_step is None:
        return []
    last, out = flight.last_step, []
    # replayed: those so far; an error that left the device unreadable comes after the last steps that could be kept
    for event in [e for e in flight.events if e["step"] <= last or e.get("unread")]:
        cause = event["cause"]
        kind = "exception" if cause == "exception" else "non-finite" if "non-finite" in cause else "spike"
        began = event.get("began") or []
        names = named(event)
        was_stopped = stopped(event)
        cause_found = cause_of(event) if kind == "spike" else None
        # non-finite values that the replay found float16's range could not hold: an overflow, not a fault of the math
        overflow = kind == "non-finite" and "overflow" in event.get("made", {})
        # the value that broke the band: the total gradient norm, the first weight's score, else the loss
        value = {"gradient spike": event.get("grad_total"), "weight spike": began[0]["score"] if began else None}.get(
            cause, event.get("loss")
        )
        if cause_found is not None and not cause_found.names_weights:
            names, began = [], []
        if was_stopped and not names:
            continue  # said in the notes
        healthy = (
            "training runs to its end" if kind == "exception" else f"loss and total gradient norm within "
            f"{spikes.SPIKE:g} spreads of their median over the last {spikes.BAND} steps, each weight's update "
            f"and norm within {spikes.WEIGHT_SPIKE:g}"
        )  # fmt: skip
        check = "run stopped" if was_stopped else "run ended by an exception" if kind == "exception" else cause
        out.append(Verdict(
            "warning" if kind == "spike" or was_stopped else "fatal", check,
            ", ".join(names[:WORST]) + (f" and {len(names) - WORST} more" if len(names) > WORST else ""),
            float(value) if value is not None else math.nan, healthy,
            (event_text(event) if cause_found is None else cause_found.text(event)) + guarded_text(event),
            cause_found.advice if cause_found is not None else _EVENT_ADVICE[
                "unread" if event.get("unread") else "stopped" if was_stopped
                else "calm end" if kind == "exception" and not names else "overflow" if overflow else kind
            ],
            len(names), tuple((b["name"], float(b["score"])) for b in began[:WORST]), event["step"],
            rule=f"flight.{'stopped' if was_stopped else kind}",
            why=cause_found.id if cause_found is not None else "overflow" if overflow else "",
        ))  # fmt: skip
    return out


#: The rules whose verdict, held before a spike or a death, makes it the instability's (attention logits growing,
#: Adam's steps cancelling: the run had gone unstable before it blew up).
INSTABILITY = ("instability.attention_logits", "instability.attention_entropy", "lr.adam_step", "lr.adam_shrink")


def after_instability(verdicts: list[Verdict], held: dict[str, Verdict]) -> list[Verdict]:
    """The flight recorder's spikes and deaths that came after an instability rule held (``held``: rule id -> its
    first verdict, whose ``since`` is the first logged step it held at): said so, with that verdict's check and
    advice, its cause the instability (``why``); where the event named a weight, it still names it. Held at a step
    before the event's, not at its own: a blow-up moves those signals itself (a NaN made in an MLP layer at step 400
    sends the attention logits measured at 400 past their line)."""
    out = []
    for v in verdicts:
        step = v.step if v.rule.startswith("flight.") and v.rule != "flight.stopped" else None
        before = [u for r, u in held.items() if r in INSTABILITY and step is not None and (u.since or 0) < step]
        if not before:
            out.append(v)
            continue
        first = min(before, key=lambda u: u.since or 0)
        cause = f"{v.cause}; the run was unstable before it: {first.check} since step {first.since} ({first.healthy})"
        out.append(replace(v, cause=cause, advice=first.advice, why="instability"))
    return out


def flight_notes(flight: FlightRecord | None) -> list[str]:
    """What the flight recorder kept, said even when it saw no event."""
    if flight is None or not flight.steps:
        return []
    events = len(flight.events)
    stops = [event_text(e) for e in flight.events if stopped(e) and not named(e)]
    joined = [(s, int(n)) for s in flight.steps if (n := flight.value("flight_joined", s))]
    began = [f"{n} parameter{'s' if n != 1 else ''} began training at step {s} (unfrozen): a spike in the {JOINED} "
             "steps after it is the change's, no event" for s, n in joined]  # fmt: skip
    guarded = [s for s in flight.steps if flight.value("flight_guarded", s) == 1]
    skips = []
    if guarded:
        listed = ", ".join(map(str, guarded[:10])) + (" ..." if len(guarded) > 10 else "")
        skips = [f"the guard skipped {len(guarded)} step{'s' if len(guarded) != 1 else ''} (not applied): {listed}"]
    kept = len(flight.steps)
    summary = (f"flight recorder: {kept} step{'s' if kept != 1 else ''} kept (every step, the last {flight.window} "
               f"before each event and the end), {events} event{'s' if events != 1 else ''}")  # fmt: skip
    return [summary, *began, *skips, *stops]
