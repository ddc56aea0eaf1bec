"""The flight recorder's events as verdicts. Events are facts, not rules: the recorder decided them while the run
went on, at every step, against bands (:mod:`lightning_netdiag.spikes`), so they are said as they were, never
replayed. Calibration: ``docs/diagnosis.md#the-flight-recorder``."""

from __future__ import annotations

import math

from lightning_netdiag import spikes
from lightning_netdiag.flight.events import event_text, named, stopped
from lightning_netdiag.record import FlightRecord
from lightning_netdiag.rules.base import WORST, Verdict

__all__ = ["event_verdicts", "flight_notes"]

_EVENT_ADVICE = {
    "spike": "look at the first weights named, at that step: lower their learning rate (a parameter group of their "
             "own) or the rate overall, clip gradients, check the batch of that step; the full measurement of the "
             "next step is in the other checks",
    "non-finite": "the module or weights named first went first: look for a log(0), a division by zero or an "
                  "overflow there (fp16 without a loss scaler); lower the learning rate, clip gradients",
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
        if was_stopped and not names:
            continue  # said in the notes
        # the value that broke the band: the total gradient norm, a weight's score, else the loss
        value = {"gradient spike": event.get("grad_total"), "weight spike": began[0]["score"] if began else None}.get(
            cause, event.get("loss")
        )
        healthy = (
            "training runs to its end" if kind == "exception" else f"loss and total gradient norm within "
            f"{spikes.SPIKE:g} spreads of their median over the last {spikes.BAND} steps, each weight's update "
            f"and norm within {spikes.WEIGHT_SPIKE:g}"
        )  # fmt: skip
        check = "run stopped" if was_stopped else "run ended by an exception" if kind == "exception" else cause
        out.append(Verdict(
            "warning" if kind == "spike" or was_stopped else "fatal", check,
            ", ".join(names[:WORST]) + (f" and {len(names) - WORST} more" if len(names) > WORST else ""),
            float(value) if value is not None else math.nan, healthy, event_text(event),
            _EVENT_ADVICE[
                "unread" if event.get("unread") else "stopped" if was_stopped
                else "calm end" if kind == "exception" and not names else kind
            ],
            len(names), tuple((b["name"], float(b["score"])) for b in began[:WORST]), event["step"],
            rule=f"flight.{'stopped' if was_stopped else kind}",
        ))  # fmt: skip
    return out


def flight_notes(flight: FlightRecord | None) -> list[str]:
    """What the flight recorder kept, said even when it saw no event."""
    if flight is None or not flight.steps:
        return []
    events = len(flight.events)
    stops = [event_text(e) for e in flight.events if stopped(e) and not named(e)]
    return [f"flight recorder: {len(flight.steps)} steps kept (every step, the last {flight.window} before each "
            f"event and the end), {events} event{'s' if events != 1 else ''}", *stops]  # fmt: skip
