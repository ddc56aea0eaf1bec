"""Why a run spiked: the cause the report gives a flight recorder's spike, from the evidence its event holds (how many
weights rose with it, a jump of the learning rate at its step, whether its loss came back into its band). Real short
runs with a known fault, in the plain loop and under Lightning; every cause by construction on synthetic events."""

import lightning as L
import pytest
import torch
from helpers import loader
from test_flight import Mlp
from torch.nn import functional as F

from lightning_netdiag import FlightRecorder, NetDiag, report, spikes
from lightning_netdiag.rules.flight import SPIKE_CAUSES, cause_of

AT, STEPS = 150, 200  # the fault's step; the band needs 50 steps before it


def corrupt(step: int, x: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``AT`` garbage (random labels, inputs scaled up) for ``kind == "batch"``; its labels given to
    the wrong rows (each its neighbour's) for ``"shuffled"``."""
    if kind == "batch" and step == AT:
        g = torch.Generator().manual_seed(1)
        return x * 5, torch.randint(0, 4, y.shape, generator=g)
    if kind == "shuffled" and step == AT:
        return x, y.roll(1)
    return x, y


def optimizer_for(model: Mlp) -> torch.optim.Optimizer:
    """AdamW; ``blocks.2`` in a parameter group of its own."""
    layer = [p for n, p in model.named_parameters() if n.startswith("blocks.2")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.2")]
    return torch.optim.AdamW([{"params": rest}, {"params": layer}], lr=1e-2)


def jump(step: int, optimizer: torch.optim.Optimizer, kind: str, at: int = AT) -> None:
    """From step ``at`` every group's rate x30 (``"rate"``: a schedule's bug), or ``blocks.2``'s x1000 (``"layer"``)."""
    if step == at and kind == "rate":
        for group in optimizer.param_groups:
            group["lr"] *= 30
    if step == at and kind == "layer":
        optimizer.param_groups[1]["lr"] *= 1000


def loop(
    kind: str, writer=None, model: Mlp | None = None, steps: int = STEPS, rate_at: int | None = None, tell_loss=True
):
    """``kind``'s fault at step ``AT``; every group's rate x30 at ``rate_at`` too, where given. Without
    ``tell_loss`` the recorder reads the loss from ``loss.backward()``."""
    model = model if model is not None else Mlp()
    optimizer = optimizer_for(model)
    batches = list(loader(batch_size=32))
    with NetDiag(model, optimizer, writer, every_n_steps=50) as diag:
        for step in range(steps):
            diag.batch_index(step=step)
            jump(step, optimizer, kind)
            if rate_at is not None:
                jump(step, optimizer, "rate", at=rate_at)
            x, y = corrupt(step, *batches[step % len(batches)], kind)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if tell_loss:
                diag.loss(loss)
            optimizer.step()
    return diag.flight.record


def spikes_said(flight) -> list:
    return [v for v in report.summarize(flight=flight).verdicts if v.rule.startswith("flight.")]


def test_a_healthy_run_has_no_event():
    assert loop("healthy").events == []


def test_a_corrupted_batch_is_named_as_the_batch_and_no_layer():
    (v,) = spikes_said(loop("batch"))
    assert (v.rule, v.why, v.check, v.step, v.hits, v.layer) == ("flight.spike", "batch", "loss spike", AT, 0, "")
    assert f"the batch of step {AT} (loss " in v.cause and f"back in band at {AT + 1}" in v.cause
    assert "4 of 4 weights' gradients" in v.cause and "look at the batch of that step" in v.advice


def test_a_batch_that_moves_the_loss_alone_is_the_batch():
    # shuffled labels: the loss 5x its median for one step, no weight's gradient nor update out of its band
    (v,) = spikes_said(loop("shuffled", tell_loss=False))  # the loss read from `loss.backward()`
    assert (v.why, v.step, v.check, v.hits) == ("batch", AT, "loss spike", 0)
    assert "0 of 4 weights' gradients and 0 of their updates rose with it" in v.cause


def test_every_groups_rate_jumping_is_named_as_the_learning_rate():
    with pytest.warns(UserWarning, match=r"FlightRecorder: .* at step 150: .*") as warned:
        (v,) = spikes_said(loop("rate"))
    assert (v.why, v.step, v.hits) == ("learning_rate", AT, 0)
    assert v.check == "weight spike" and v.value > spikes.WEIGHT_SPIKE  # the score past its line, no weight named
    jumped = f"the learning rate went from 0.01 to 0.3 at step {AT} (every parameter group)"
    assert jumped in v.cause
    # said when it happens too: the rate's rise is known at its step
    (live,) = [str(w.message) for w in warned if str(w.message).startswith("FlightRecorder:")]
    assert f"; {jumped}; " in live and "of their updates rose with it" in live


def test_one_groups_rate_jumping_names_its_weight_and_its_rate():
    (v, *_) = spikes_said(loop("layer"))
    assert (v.why, v.step, v.layer.split(",")[0]) == ("weight", AT, "blocks.2.weight")
    assert "the learning rate went from 0.01 to 10 at step 150 (1 of 2 groups)" in v.cause


class Corrupted(L.LightningModule):
    """``model`` under Lightning, its batch of step AT garbage (:func:`corrupt`)."""

    def __init__(self, model: Mlp) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = corrupt(self.global_step, *batch, "batch")
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return optimizer_for(self.model)


def lightning(*callbacks: L.Callback) -> None:
    """:class:`Corrupted` trained for STEPS steps with ``callbacks``."""
    trainer = L.Trainer(max_steps=STEPS, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(Corrupted(Mlp()), loader(batch_size=32))


def test_under_lightning_a_corrupted_batch_is_the_batch():
    flight = FlightRecorder()
    lightning(flight)
    (v,) = spikes_said(flight.record)
    assert (v.why, v.step) == ("batch", AT)


def event(**evidence) -> dict:
    return {"step": 300, "cause": "loss spike", "loss": 4.8, "loss_median": 2.2, **evidence}


BEGAN = [{"name": "h.0.attn.c_proj.weight", "series": "update norm", "step": 300, "score": 9.0}]
#: cause id -> an event whose evidence is that cause's, and nothing before it in the order
CAUSES = {
    "not_reproducible": event(replayed={"same": False, "first": 10.5, "again": 3.25}, rate={"from": 1e-3, "to": 3e-2,
                              "groups": 2, "of": 2}, began=BEGAN, lead=3, rose={"gradient": 9, "update": 9, "of": 9}),
    "learning_rate": event(rate={"from": 1e-3, "to": 3e-2, "groups": 2, "of": 2}, rose={"gradient": 1, "update": 9,
                                                                                          "of": 9}),
    "weight": event(began=BEGAN, lead=3, rose={"gradient": 9, "update": 9, "of": 9}, back=301,
                    replayed={"same": True, "first": 10.5, "again": 10.5}),
    "batch": event(began=BEGAN, lead=0, rose={"gradient": 9, "update": 9, "of": 9}, back=301),
    "unclear": event(began=BEGAN, lead=0, rose={"gradient": 9, "update": 9, "of": 9}, back=None),
}  # fmt: skip


def test_every_spike_cause_by_construction():
    assert {c.id for c in SPIKE_CAUSES} == set(CAUSES)
    for want, e in CAUSES.items():
        assert cause_of(e).id == want, (want, e)
    assert "cause unclear" in cause_of(CAUSES["unclear"]).text(CAUSES["unclear"])
    assert cause_of(event(began=BEGAN, lead=0, rose={"gradient": 1, "update": 1, "of": 9})).id == "weight"  # alone
    # only a few gradients rose with it, no weight's own change: still the batch's, where the loss left its band
    # (alone or with the gradients) and came back
    grads = [{**BEGAN[0], "series": "gradient norm"}]
    assert cause_of(event(began=grads, lead=0, rose={"gradient": 2, "update": 0, "of": 9}, back=301)).id == "batch"
    with_loss = event(
        cause="gradient spike", also=["loss spike"], began=grads, rose={"gradient": 2, "update": 0, "of": 9}
    )
    assert cause_of({**with_loss, "back": 301}).id == "batch"
    # ... but not a gradient spike whose loss stayed in band: one weight's gradient (a healthy MoE's router at batch
    # 16 did this), or none (a spike of the total alone) is no batch shown
    gradient = event(cause="gradient spike", loss=0.6, loss_median=0.96, back=76)
    assert cause_of({**gradient, "began": grads, "rose": {"gradient": 1, "update": 0, "of": 19}}).id == "weight"
    assert cause_of({**gradient, "began": [], "rose": {"gradient": 0, "update": 0, "of": 19}}).id == "unclear"
    assert cause_of(event(began=grads, lead=0, rose={"gradient": 2, "update": 0, "of": 9}, back=None)).id == "weight"
    assert cause_of(event()).id == "unclear"  # no evidence (a record of an older netdiag): no layer named
    scaled = [{**BEGAN[0], "series": "weight norm"}]  # a weight that changed by itself: its norm left its band
    assert cause_of(event(began=scaled, lead=0, rose={"gradient": 9, "update": 9, "of": 9}, back=None)).id == "weight"


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_a_cause_that_names_no_layer_gives_a_verdict_without_one(cause):
    from lightning_netdiag.record import FlightRecord

    flight = FlightRecord()
    flight.add(300, {("flight_grad_total", ""): 1.0}, {})
    flight.events = [CAUSES[cause]]
    (v,) = report.evaluate(flight=flight)
    assert (v.rule, v.why) == ("flight.spike", cause) and (v.hits > 0) == cause_of(CAUSES[cause]).names_weights


def test_a_spike_after_an_instability_is_said_to_be_the_instabilitys():
    from lightning_netdiag.record import FlightRecord, LogitRecord

    logits = LogitRecord(every_n_steps=50)
    for step in range(0, 350, 50):  # the largest attention logit past its line from step 100 on
        logits.add(step, {("attn_logit_max", "h.0.attn"): 20.0 if step < 100 else 500.0}, {})
    flight = FlightRecord()
    flight.add(300, {("flight_grad_total", ""): 1.0}, {})
    flight.events = [CAUSES["unclear"]]
    (spike, growing) = report.summarize(logits=logits, flight=flight).verdicts
    assert (spike.why, spike.check, growing.rule) == ("instability", "loss spike", "instability.attention_logits")
    # named from step 200: held at 3 logging steps (100, 150, 200)
    assert "the run was unstable before it: attention logits growing since step 200" in spike.cause
    assert spike.advice == growing.advice  # what to change is the instability's
    flight.events = [{**CAUSES["unclear"], "step": 200}]  # at the step it was first named at: its effect, not its cause
    (same_step, _) = report.summarize(logits=logits, flight=flight).verdicts
    assert same_step.why == "unclear"
    quiet = LogitRecord(every_n_steps=50)
    for step in range(0, 350, 50):
        quiet.add(step, {("attn_logit_max", "h.0.attn"): 20.0}, {})
    (alone,) = report.summarize(logits=quiet, flight=flight).verdicts
    assert alone.why == "unclear"


def test_the_batch_of_a_spike_is_kept_beside_the_logs_and_netdiag_batch_prints_it(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import cli, tags

    flight = loop("batch", SummaryWriter(tmp_path))
    batches = list(loader(batch_size=32))
    x = batches[AT % len(batches)][0] * 5  # what the model received at the event's step
    (event,) = flight.events
    name = tags.batch_file("netdiag", AT)
    assert event["batch"]["file"] == name and event["batch"]["index"] == [{"step": AT}]
    assert event["batch"]["bytes"] == x.numel() * 4 and event["batch"]["cut"] is False
    saved = torch.load(tmp_path / name, weights_only=True)
    (args, kwargs) = saved["micro_batches"][0]
    assert torch.equal(args[0], x) and kwargs == {}
    (v,) = spikes_said(flight)
    assert f"the batch is kept beside the logs ({name}: netdiag batch RUN --step {AT})" in v.cause
    assert cli.main(["batch", str(tmp_path), "--step", str(AT)]) == 0
    printed = capsys.readouterr().out
    assert f"batch of step {AT} ({name})" in printed and "micro-batch 0: {'step': 150}" in printed
    assert f"micro-batch 0[0][0]: (32, 6) float32: mean {x.double().mean():.4g}" in printed
    assert cli.main(["batch", str(tmp_path), "--step", "3"]) == 2  # none kept there: said, with those kept


def test_each_steps_batch_fingerprint_equals_a_direct_computation():
    flight = loop("healthy")
    batches = list(loader(batch_size=32))
    for step, value in flight.points("flight_batch"):
        x = batches[step % len(batches)][0].double()
        assert value == pytest.approx(float(x.sum() + 1e-3 * (x * x).sum()), rel=1e-6)


def test_a_batch_larger_than_keep_batch_is_cut_to_its_first_rows(tmp_path):
    from lightning_netdiag.meters.flight import _to_host

    kept, n, cut = _to_host(((torch.ones(10, 4), torch.arange(10)), {"mask": torch.ones(10, 2)}), cap=200)
    (x, ids), extra = kept
    # 160 bytes of x, the 5 ids that fit in the 40 left, no row of the mask
    assert (x.shape, ids.shape, extra["mask"].shape, cut) == ((10, 4), (5,), (0, 2), True) and n == 200


def test_a_spike_that_does_not_reproduce_is_said_so():
    # a fault of the hardware, once: the output of the step AT's forward wrong by 30x; the same forward run again
    # on the same batch, weights and random state gives the right one
    model = Mlp()
    calls, forward = [], model.forward

    def flaky(x):
        out = forward(x)
        if torch.is_grad_enabled():  # training's forward (the replay runs without gradients)
            calls.append(1)
            if len(calls) == AT + 1:
                return out * 30
        return out

    model.forward = flaky
    record = loop("healthy", model=model)
    event = record.events[0]  # its bad update shakes the next steps too: the guard would have kept it out
    assert event["step"] == AT and event["replayed"]["same"] is False
    assert event["replayed"]["first"] == pytest.approx(30 * event["replayed"]["again"], rel=1e-5)
    v = spikes_said(record)[0]
    assert (v.why, v.step, v.layer) == ("not_reproducible", AT, "")
    assert "not reproducible: the step's forward, run again on its batch" in v.cause and "nvidia-smi" in v.advice


def test_a_corrupted_batchs_spike_reproduces():
    (event,) = loop("batch").events
    assert event["replayed"]["same"] is True


def test_a_later_event_beyond_the_first_window_is_drawn_in_a_window_of_its_own():
    from lightning_netdiag import plots

    flight = loop("batch", steps=AT + 130, rate_at=AT + 100)
    assert [e["step"] for e in flight.events] == [AT, AT + 100]
    figures = plots.draw_all(flight=flight)
    assert {n for n in figures if n.startswith("flight")} == {"flight", f"flight_{AT + 100}"}
    later = figures[f"flight_{AT + 100}"].axes[1]
    assert f"step {AT + 100}" in later.get_title()
    marked = {(line.get_xdata()[0], line.get_linestyle()) for line in later.lines}
    assert marked == {(AT + 100, "--"), (AT, ":")}  # its own event, and the one before in its window, lighter
