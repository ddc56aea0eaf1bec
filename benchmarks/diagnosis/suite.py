"""The diagnosis suite: healthy recipes, learning-rate sweeps and runs with one fault, each with what a correct
health report says about it.

A run is a :class:`~models.Recipe` and its label. Labels:

- ``healthy``: a recipe known to train well; a correct report gives **no warning at all** on it.
- a fault: the check that must name it (``"saturation"``, ``"not learning"``, ...), injected into a healthy
  twin with only that one thing changed. Other checks may fire too; its own must.
- a learning-rate sweep point (``sweep`` set): labelled after the sweep has run, from its final loss against the
  sweep's best of the same seed (:func:`sweep_label`).
- an instability run (``twin`` set): labelled after the suite has run, from its outcome against its healthy twin
  (the same model at its best rate) of the same seed: unstable (its own check must name it) where its final
  loss ends more than 5 % above the twin's or it diverges; else healthy.
- a flight run (``fault`` set): a healthy recipe with a blow-up injected at a known step (and, where it has one,
  a known layer); the flight recorder must name that step (within one step) and that layer first. Its healthy
  twins are the recipes it was injected into (here, healthy runs of the suite).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from models import Fault, Recipe

from lightning_netdiag.rules import BY_ID as RULE

HEALTHY = "healthy"


@dataclass(frozen=True)
class Run:
    name: str
    recipe: Recipe
    expect: str = HEALTHY  # the check that must name the fault, or HEALTHY
    about: str = ""  # the fault, in words
    sweep: str | None = None  # the sweep this run belongs to; its label comes from the sweep's losses
    twin: str | None = None  # the healthy twin of an instability run; its label comes from their losses
    quick: bool = False  # in the quick subset that the tests run
    fault: Fault | None = None  # a flight run's injected blow-up (its step and layer); None: it has its own

    def shortened(self) -> Run:
        """This run for the quick subset: the long makemore runs cut to 2,000 steps; a sweep's point on its own,
        with the label the full suite gives it on both seeds."""
        recipe = replace(self.recipe, steps=min(self.recipe.steps, QUICK_STEPS))
        expect = QUICK_POINTS.get((self.sweep, self.recipe.lr), QUICK_TWINS.get(self.name, self.expect))
        return replace(self, recipe=recipe, sweep=None, twin=None, expect=expect)


QUICK_STEPS = 2_000


#: Each model's recipe; its sweep takes the learning rates of :data:`GRID` from 30x below the recipe's to 30x
#: above, neighbours about 3x apart.
SWEEPS = {
    "makemore": (Recipe("makemore", 10_000, 0.1), "the lecture's MLP (kaiming preset), SGD"),
    "gpt": (Recipe("gpt", 600, 3e-3), "the GPT example (12 blocks), AdamW"),
    "vit": (Recipe("vit", 600, 3e-3), "timm ViT on the digits, AdamW"),
    "gru": (Recipe("gru", 800, 1e-2), "makemore's GRU on the names, AdamW"),
    "cnn": (Recipe("cnn", 600, 0.1), "a CNN with BatchNorm on the digits, SGD with momentum"),
    "relu-mlp": (Recipe("relu-mlp", 600, 0.03), "an 8-block ReLU MLP on the digits, SGD with momentum"),
}
GRID = [float(f"{m}e{e}") for e in range(-5, 3) for m in (1, 3)]


#: The sweep points in the quick subset, with the label the full suite gives them on both seeds.
QUICK_POINTS = {
    ("makemore", 0.1): HEALTHY, ("cnn", 0.1): HEALTHY, ("relu-mlp", 0.03): HEALTHY, ("gru", 0.01): HEALTHY,
    ("relu-mlp", 0.003): "learning rate too low", ("relu-mlp", 0.3): "learning rate too high",
    ("gru", 0.1): "learning rate too high",
}  # fmt: skip


def sweep_runs() -> list[Run]:
    out = []
    for model, (recipe, about) in SWEEPS.items():
        at = min(range(len(GRID)), key=lambda i: abs(GRID[i] / recipe.lr - 1))
        for lr in GRID[at - 3 : at + 4]:
            r = Recipe(recipe.model, recipe.steps, lr, recipe.options)
            out.append(Run(f"{model} lr={lr:g}", r, about=about, sweep=model, quick=(model, lr) in QUICK_POINTS))
    return out


def _mm(preset: str, **options) -> Recipe:
    return Recipe("makemore", 10_000, 0.1, {"preset": preset, **options})


#: The recipes known to be healthy besides the sweeps' good rates, and one fault each in a healthy twin.
# fmt: off
RUNS = [
    Run("makemore fix-tanh", _mm("fix-tanh"), about="the lecture's tanh fix (W1 * 0.2)"),
    Run("makemore batchnorm", _mm("batchnorm"), about="the lecture's BatchNorm before the tanh"),
    Run("makemore deep", _mm("deep"), about="the lecture's 5-layer net, gain 5/3, BatchNorm"),
    Run("makemore deep-nobn", _mm("deep-nobn"), about="the lecture's 5-layer net, gain 5/3, no BatchNorm"),
    Run("relu-mlp fp16 scaled", Recipe("relu-mlp", 600, 0.03, precision="16-mixed"),
        about="fp16 autocast with a GradScaler (it skips the first steps, whose gradients overflow)", quick=True),
    Run("relu-mlp fits its data", Recipe("relu-mlp", 600, 0.03, {"augmented": False}),
        about="no augmentation: the training loss goes to about 0 and the gradients with it", quick=True),
    Run("makemore original", _mm("original"), "over-confident output",
        "the lecture's original: output layer not shrunk, loss at init 27.9 instead of ln 27 = 3.30", quick=True),
    Run("makemore fix-softmax", _mm("fix-softmax"), "saturation",
        "the lecture's fix-softmax: W1 not shrunk, the hidden tanh saturated at init", quick=True),
    Run("gru randn init", Recipe("gru", 800, 1e-2, {"init_std": 1.0}), "saturation",
        "the GRU's weights drawn N(0, 1), without 1/sqrt(fan_in)"),
    Run("makemore deep-nobn net.4 x0.01", _mm("deep-nobn", scale_layer=("net.4", 0.01)), "dead layer",
        "deep-nobn with one hidden layer's init scaled by 0.01"),
    Run("makemore deep-nobn gain 0.5", _mm("deep-nobn", gain=0.5), "vanishing gradient",
        "the lecture's deep net without BatchNorm at gain 0.5", quick=True),
    Run("relu-mlp gain 1.5", Recipe("relu-mlp", 600, 0.03, {"gain": 1.5}), "exploding gradient",
        "every block's init 1.5x He: signals grow 1.5x per block, forward and backward", quick=True),
    Run("relu-mlp dead bias", Recipe("relu-mlp", 600, 0.03, {"dead_bias": (3, -3.0)}), "dead units",
        "block 3's bias initialised to -3: most of its ReLU units start dead and stay so", quick=True),
    Run("cnn head left out", Recipe("cnn", 600, 0.1, {"left_out": "fc"}), "not learning",
        "the optimizer built from a list that misses the classifier", quick=True),
    Run("gpt block 5 at lr 0", Recipe("gpt", 600, 3e-3, {"zero_lr": "gpt.transformer.h.5"}), "not learning",
        "one block's parameter group at learning rate 0"),
    Run("relu-mlp fp16 unscaled", Recipe("relu-mlp", 600, 0.03, precision="16-unscaled"), "gradient underflow",
        "fp16 autocast with the loss scaler turned off", quick=True),
    Run("relu-mlp lr 3", Recipe("relu-mlp", 600, 3.0), "non-finite",
        "SGD at 100x the recipe's rate: the weights overflow", quick=True),
    Run("cnn lr 30 no warm-up", Recipe("cnn", 600, 30.0, {"warmup": False}), "loss diverged",
        "SGD at 300x the recipe's rate from step 0: the loss rises to 1e14, finite (BatchNorm)", quick=True),
]
# fmt: on


# The labels are the checks of the rules that must name each fault (the registry's words, never typed again).
ATTENTION, EPS = RULE["instability.attention_logits"].check, RULE["instability.adam_eps"].check
TOO_HIGH, TOO_LOW = RULE["lr.adam_shrink"].check, RULE["lr.sgd_low"].check
#: What an SGD rate too high does to ReLU units, whose advice includes lowering the rate.
DEAD_UNITS = RULE["training.dead_units"].check


def _twin(model: str, name: str, lr_factor: float, own: str, about: str, precision: str = "32-true",
          quick: bool = False, **options) -> Run:  # fmt: skip
    """An instability run: ``model`` at ``lr_factor`` times its best rate without warm-up (unless ``options`` say
    otherwise), labelled against its healthy twin ``{model} best`` (which is the run named so)."""
    best, steps = INSTABILITY_BEST[model]
    recipe = Recipe(model, steps, best * lr_factor, {"warmup": False, **options}, precision=precision)
    twin = None if name == "best" else f"{model} best"
    return Run(f"{model} {name}", recipe, own, about, twin=twin, quick=quick)


#: The instability suite's models: the best AdamW rate without warm-up (of 1e-3, 3e-3, 1e-2 on seed 0: tiny-lm
#: 1.91, 1.81, 1.86; the GPT example 2.10, 2.34, 2.27: without its warm-up, 12 blocks stall at 3e-3) and steps.
INSTABILITY_BEST = {"tiny-lm": (3e-3, 800), "gpt": (1e-3, 600)}
_lm, _gpt = functools.partial(_twin, "tiny-lm"), functools.partial(_twin, "gpt")

# fmt: off
#: Transformers trained with AdamW: at the best rate, 3x, 10x and 30x above it without warm-up, the high rates
#: again with warm-up and with qk-layernorm, in fp16, without weight decay, with a large eps, below the best.
INSTABILITY = [
    _lm("best", 1, HEALTHY, "a 4-block causal transformer with its own eager attention, AdamW at its best rate",
        quick=True),
    _lm("lr x3", 3, ATTENTION, "3x the best rate, no warm-up"),
    _lm("lr x10", 10, ATTENTION, "10x the best rate, no warm-up", quick=True),
    _lm("lr x30", 30, ATTENTION, "30x the best rate, no warm-up", quick=True),
    _lm("lr x10 warmup", 10, ATTENTION, "10x the best rate, with warm-up", warmup=True),
    _lm("lr x30 warmup", 30, ATTENTION, "30x the best rate, with warm-up", warmup=True),
    _lm("lr x10 qk-norm", 10, TOO_HIGH, "10x the best rate, q and k layer-normalised", qk_norm=True),
    _lm("lr x30 qk-norm", 30, TOO_HIGH, "30x the best rate, q and k layer-normalised", qk_norm=True, quick=True),
    _lm("fused lr x30", 30, ATTENTION, "30x the best rate, attention through F.scaled_dot_product_attention",
        fused=True),
    _lm("fp16 lr x30", 30, ATTENTION, "30x the best rate in fp16 with a GradScaler", precision="16-mixed"),
    _lm("fp16 lr x30 no weight decay", 30, ATTENTION, "30x the best rate in fp16, no weight decay: the attention "
        "logits overflow fp16 (inf) by step 100", precision="16-mixed", weight_decay=0.0),
    _lm("no weight decay", 1, ATTENTION, "the best rate without weight decay", weight_decay=0.0),
    _lm("no weight decay lr x10", 10, ATTENTION, "10x the best rate without weight decay", weight_decay=0.0),
    _lm("eps 1e-3", 1, EPS, "the best rate with Adam's eps at 1e-3", eps=1e-3),
    _lm("lr /10", 0.1, TOO_LOW, "10x below the best rate"),
    _lm("lr /30", 1 / 30, TOO_LOW, "30x below the best rate"),
    _gpt("best", 1, HEALTHY, "the GPT example (12 blocks, fused attention), AdamW at its best rate without warm-up"),
    _gpt("lr x3", 3, TOO_HIGH, "3x the best rate, no warm-up: its 12 blocks stall for the first 200 steps"),
    _gpt("lr x10", 10, ATTENTION, "10x the best rate, no warm-up"),
    _gpt("lr x30", 30, ATTENTION, "30x the best rate, no warm-up"),
    _gpt("lr x10 warmup", 10, ATTENTION, "10x the best rate, with warm-up", warmup=True),
    _gpt("lr x30 warmup", 30, ATTENTION, "30x the best rate, with warm-up", warmup=True),
]
# fmt: on

#: The instability runs in the quick subset, with the label the full suite gives them on both seeds.
#: "tiny-lm lr x10" (seed 0): named by the softmaxes' entropy alone (its largest logit stays below ATTN_LOGIT_HIGH).
QUICK_TWINS = {
    "tiny-lm best": HEALTHY, "tiny-lm lr x30": ATTENTION, "tiny-lm lr x10": ATTENTION,
    "tiny-lm lr x30 qk-norm": TOO_HIGH,
}  # fmt: skip


SPIKE, NONFINITE = "spike", "non-finite"
#: The flight recorder's checks (its verdicts' names) that name a spike and a death.
FLIGHT_CHECKS = {
    SPIKE: ("loss spike", "gradient spike", "weight spike"),
    NONFINITE: ("non-finite loss", "non-finite gradients"),
}
#: The faults that nothing injects (the run's own course makes them): their step is the run's first non-finite loss.
NOT_INJECTED = ("fp16 overflow",)
#: The cause the report must give a spike or a death (its verdict's ``why``), by the fault injected.
FAULT_CAUSES = {
    "layer lr": "weight", "scale weight": "weight", "corrupt element": "weight", "global lr": "learning_rate",
    "corrupt batch": "batch", "shuffle labels": "batch", "repeat token": "batch", "scale inputs": "batch",
    "flaky": "not_reproducible", "fp16 overflow": "overflow",
}  # fmt: skip


def _flight(name: str, recipe: Recipe, expect: str, fault: Fault, about: str, quick: bool = False) -> Run:
    options = {**recipe.options, "fault": fault}
    return Run(name, replace(recipe, options=options), expect, about, fault=fault, quick=quick)


_RELU, _CNN = Recipe("relu-mlp", 600, 0.03), Recipe("cnn", 600, 0.1)
_LM = INSTABILITY[0].recipe  # "tiny-lm best": its best rate, no warm-up

# fmt: off
#: Runs that spike or die at a known step, injected into healthy runs of the suite, their twins: "relu-mlp
#: lr=0.03", "cnn lr=0.1", "tiny-lm best".
FLIGHT = [
    _flight("relu-mlp blocks.4 lr x100 at 300", _RELU, SPIKE, Fault("layer lr", 300, "blocks.4", 100.0),
            "one block's rate (a parameter group of its own) multiplied by 100 from step 300", quick=True),
    _flight("tiny-lm blocks.2.fc lr x100 at 400", _LM, SPIKE, Fault("layer lr", 400, "blocks.2.fc", 100.0),
            "one MLP layer's rate (a parameter group of its own) multiplied by 100 from step 400"),
    _flight("relu-mlp blocks.4 x10 at 300", _RELU, SPIKE, Fault("scale weight", 300, "blocks.4.weight", 10.0),
            "one block's weight multiplied by 10 just before step 300", quick=True),
    _flight("tiny-lm blocks.1.fc x10 at 400", _LM, SPIKE, Fault("scale weight", 400, "blocks.1.fc.weight", 10.0),
            "one MLP layer's weight multiplied by 10 just before step 400"),
    _flight("relu-mlp lr x30 at 300", _RELU, SPIKE, Fault("global lr", 300, factor=30.0),
            "every parameter group's rate multiplied by 30 from step 300 (a schedule's bug, a bad resume)"),
    _flight("tiny-lm lr x30 at 400", _LM, SPIKE, Fault("global lr", 400, factor=30.0),
            "every parameter group's rate multiplied by 30 from step 400"),
    _flight("cnn corrupted labels at 300", _CNN, SPIKE, Fault("corrupt batch", 300),
            "the labels of step 300 drawn at random", quick=True),
    _flight("tiny-lm corrupted labels at 400", _LM, SPIKE, Fault("corrupt batch", 400),
            "the labels of step 400 drawn at random"),
    _flight("relu-mlp blocks.4 divides by 0 at 300", _RELU, NONFINITE, Fault("divide by zero", 300, "blocks.4"),
            "block 4's output divided by zero from step 300 (inf, then NaN)", quick=True),
    _flight("tiny-lm blocks.2.fc divides by 0 at 400", _LM, NONFINITE, Fault("divide by zero", 400, "blocks.2.fc"),
            "an MLP layer's output divided by zero from step 400 (inf, then NaN)"),
    _flight("relu-mlp fp16 unscaled lr x30", replace(_RELU, lr=0.9, precision="16-unscaled"), NONFINITE,
            Fault("fp16 overflow", 10**9), "fp16 autocast without a loss scaler at 30x the rate: the loss reaches inf"),
    # its twin without fp16 is not a healthy run of the suite: without BatchNorm, at 0.1, seed 0 spikes once at step 79
    _flight("cnn-nonorm fp16 unscaled lr x30", replace(_CNN, lr=3.0, precision="16-unscaled",
                                                       options={"batchnorm": False}), NONFINITE,
            Fault("fp16 overflow", 10**9), "the CNN without its BatchNorms in fp16 autocast without a loss scaler at "
            "30x the rate: a convolution's output passes float16's range"),
    _flight("cnn shuffled labels at 300", _CNN, SPIKE, Fault("shuffle labels", 300),
            "the labels of step 300 given to the wrong images (each its neighbour's)"),
    _flight("tiny-lm shuffled labels at 400", _LM, SPIKE, Fault("shuffle labels", 400),
            "the targets of step 400 given to the wrong rows (each its neighbour's)"),
    _flight("tiny-lm repeated token at 400", _LM, SPIKE, Fault("repeat token", 400),
            "every input and target of step 400 one token (a shard of one character)"),
    _flight("relu-mlp inputs x10 at 300", _RELU, SPIKE, Fault("scale inputs", 300, factor=10.0),
            "the inputs of step 300 multiplied by 10 (a decoder's or a unit's bug)"),
    # not the CNN: the BatchNorm after its first convolution divides a scale of its inputs out (no fault there)
    _flight("relu-mlp blocks.4 element at 300", _RELU, SPIKE, Fault("corrupt element", 300, "blocks.4.weight", 100.0),
            "one element of block 4's weight set to 100 just before step 300 (a bit flip)"),
    _flight("tiny-lm blocks.1.fc element at 400", _LM, SPIKE,
            Fault("corrupt element", 400, "blocks.1.fc.weight", 100.0),
            "one element of an MLP layer's weight set to 100 just before step 400 (a bit flip)"),
    _flight("relu-mlp flaky x30 at 300", _RELU, SPIKE, Fault("flaky", 300, factor=30.0),
            "the network's output at step 300 30x as it ran, right when run again (a fault of the hardware)"),
    _flight("tiny-lm flaky x30 at 400", _LM, SPIKE, Fault("flaky", 400, factor=30.0),
            "the network's output at step 400 30x as it ran, right when run again"),
]

#: Healthy runs with the schedules users use (the flight recorder and every rule must stay silent).
SCHEDULES = [
    Run("relu-mlp warm restarts", replace(_RELU, options={"schedule": "restarts"}), HEALTHY,
        "relu-mlp lr=0.03 with its cosine restarted twice (three cycles, each back to the full rate)"),
    Run("tiny-lm warm restarts", replace(_LM, options={**_LM.options, "schedule": "restarts"}), HEALTHY,
        "tiny-lm best with its cosine restarted twice"),
    Run("relu-mlp step decay", replace(_RELU, options={"schedule": "step"}), HEALTHY,
        "relu-mlp lr=0.03, its rate a tenth at half the steps, a hundredth at three quarters"),
    Run("tiny-lm step decay", replace(_LM, options={**_LM.options, "schedule": "step"}), HEALTHY,
        "tiny-lm best, its rate a tenth at half the steps, a hundredth at three quarters"),
    Run("cnn convs unfrozen at 300", replace(_CNN, options={"unfreeze": ("conv", 300)}), HEALTHY,
        "the CNN with its convolutions frozen until step 300 (the head trained first)"),
    Run("tiny-lm blocks.0 unfrozen at 400", replace(_LM, options={**_LM.options, "unfreeze": ("blocks.0", 400)}),
        HEALTHY, "tiny-lm best with its first block frozen until step 400"),
]
# fmt: on


def all_runs() -> list[Run]:
    return sweep_runs() + RUNS + INSTABILITY + FLIGHT + SCHEDULES
