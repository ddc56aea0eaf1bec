"""Default callbacks on the models people train: HF transformers (GPT-2, BERT, LLaMA), torchvision (ResNet-18),
timm (ViT, EfficientNet), a tutorial-style functional CNN, and the lecture's bare-parameter style.

For each: every activation call is a watched layer (the expected layers are written out here, or counted
with the test's own module hooks), every weight of rank >= 2 is in D3 and D4, and the numbers of ResNet's
reused ReLU (two calls per forward) and of functional calls equal the lecture's formulas on the same tensors.
"""

from collections import defaultdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import all_callbacks, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_netdiag import SaturationMonitor, report

STEPS = 2
#: A transformer config small enough for a test: 2 layers, width 16.
TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16)  # fmt: skip


class Wrap(L.LightningModule):
    """A library's model, as users wrap it: ``self.model``; language models get their own loss."""

    def __init__(self, model: nn.Module, lm: bool = False) -> None:
        super().__init__()
        self.model, self.lm = model, lm

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.lm:
            return self.model(input_ids=x, labels=x).loss
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def tokens() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 64, (8, 12), generator=g), torch.zeros(8, dtype=torch.long)), 4)


def images(size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g))
    return DataLoader(data, batch_size=4)


def fit(tmp_path, module: L.LightningModule, data: DataLoader) -> list:
    cbs = all_callbacks(1)
    trainer(tmp_path, cbs, logger=False, max_steps=STEPS, limit_val_batches=0).fit(module, data)
    return cbs


def names(cb, metric: str) -> set[str]:
    head = f"{cb.prefix}/{metric}/"
    return {tag[len(head) :] for tag in cb.history if tag.startswith(head)} - {"_target"}


def value(cb, metric: str, name: str, step: int) -> float:
    return dict(cb.history[f"{cb.prefix}/{metric}/{name}"])[step]


def assert_every_weight_measured(module: nn.Module, cbs: list) -> None:
    weights = {n for n, p in module.named_parameters() if p.dim() >= 2}  # named_parameters lists a tied one once
    assert names(cbs[1], "grad_data_ratio") == weights
    assert names(cbs[2], "update_data_log10") == weights


def calls_of(model: nn.Module, types: tuple[type, ...], prefix: str = "model.") -> set[str]:
    """The activation calls of one forward, counted by the test's own hooks: ``name``, ``name-2``, ..."""
    seen: dict[str, int] = defaultdict(int)
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, types):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, seen[name] + 1)))
    with torch.no_grad():
        model(next(iter(images()))[0][:2])
    for h in handles:
        h.remove()
    return {f"{prefix}{n}" + (f"-{k}" if k > 1 else "") for n, count in seen.items() for k in range(1, count + 1)}


def lecture_numbers(outputs: list[torch.Tensor], grads: list[torch.Tensor], saturated, unit_dim: int) -> dict:
    """The lecture's formulas, written directly: mean, std, % saturated, % dead units, gradient mean and std."""
    t, g = torch.cat([o.flatten(1) for o in outputs]).double(), torch.cat([x.flatten(1) for x in grads]).double()
    full = torch.cat(outputs)
    mask = saturated(full)
    per_unit = mask.movedim(unit_dim, 0).reshape(mask.shape[unit_dim], -1)
    return {
        "act_mean": t.mean().item(),
        "act_std": t.std().item(),
        "act_saturated_pct": (mask.float().mean() * 100).item(),
        "act_dead_pct": (per_unit.all(dim=1).float().mean() * 100).item(),
        "act_grad_mean": g.mean().item(),
        "act_grad_std": g.std().item(),
    }


def assert_lecture_numbers(sat, layer: str, step: int, expected: dict) -> None:
    for metric, number in expected.items():
        assert value(sat, metric, layer, step) == pytest.approx(number, rel=1e-4, abs=1e-9), (layer, metric)


# --- transformers --------------------------------------------------------------------------------------


def test_gpt2_bert_llama_watch_their_own_activation_classes(tmp_path):
    tf = pytest.importorskip("transformers")
    models = {
        "gpt2": (
            tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)),
            {"model.transformer.h.0.mlp.act", "model.transformer.h.1.mlp.act"},
            "gelu_tanh",
        ),
        "bert": (
            tf.BertForMaskedLM(tf.BertConfig(**TINY)),
            {
                "model.bert.encoder.layer.0.intermediate.intermediate_act_fn",
                "model.bert.encoder.layer.1.intermediate.intermediate_act_fn",
                "model.cls.predictions.transform.transform_act_fn",
            },
            "gelu",
        ),
        "llama": (
            tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, num_key_value_heads=2)),
            {"model.model.layers.0.mlp.act_fn", "model.model.layers.1.mlp.act_fn"},
            "silu",
        ),
    }
    for name, (model, layers, kind) in models.items():
        module = Wrap(model, lm=True)
        sat, *rest = fit(tmp_path / name, module, tokens())
        assert names(sat, "act_std") == names(sat, "act_grad_std") == layers, name
        assert {sat.layer_kinds[layer] for layer in layers} == {kind}
        assert all(0 <= value(sat, "act_saturated_pct", layer, 1) < 100 for layer in layers)
        assert_every_weight_measured(module, [sat, *rest])
    # GPT-2's LM head is tied to the token embedding: measured once, under the embedding's name.
    gpt2 = models["gpt2"][0]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


# --- torchvision ---------------------------------------------------------------------------------------


def test_resnet18_reused_relu_gives_one_layer_per_call_with_the_lectures_numbers(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    expected = calls_of(model, (nn.ReLU,))
    assert len(expected) == 17 and "model.layer1.0.relu-2" in expected  # 8 blocks x 2 calls + the stem's

    # The reused module's two calls, captured by the test itself at every training forward.
    outputs: dict[int, list] = defaultdict(list)
    grads: dict[int, list] = defaultdict(list)
    relu = model.layer1[0].relu

    def capture(module, inputs, output):
        if module.training:
            call = len(outputs[len(grads_done)]) % 2
            outputs[len(grads_done)].append((call, output.detach().clone()))
            output.register_hook(lambda g, call=call: grads[len(grads_done)].append((call, g.clone())))

    grads_done: list[int] = []
    relu.register_forward_hook(capture)

    class Steps(L.Callback):
        def on_train_batch_end(self, *args):
            grads_done.append(1)

    module = Wrap(model)
    cbs = all_callbacks(1)
    trainer(tmp_path, [*cbs, Steps()], logger=False, max_steps=STEPS, limit_val_batches=0).fit(module, images())
    sat = cbs[0]
    assert names(sat, "act_std") == names(sat, "act_grad_std") == expected
    assert_every_weight_measured(module, cbs)
    assert any(len(shape) == 4 for shape in cbs[1].param_shapes.values())  # conv kernels are in D3/D4
    for step in range(STEPS):
        for call, layer in ((0, "model.layer1.0.relu"), (1, "model.layer1.0.relu-2")):
            outs = [t for c, t in outputs[step] if c == call]
            gs = [g for c, g in grads[step] if c == call]
            assert len(outs) == len(gs) == 1, (
                step,
                call,
                [(c, tuple(t.shape)) for c, t in outputs[step]],
                [c for c, _ in grads[step]],
            )
            # dead units along the channel dimension of the (N, C, H, W) output
            expected_numbers = lecture_numbers(outs, gs, lambda t: t <= 0, unit_dim=1)
            assert_lecture_numbers(sat, layer, step, expected_numbers)
        # the two calls see different tensors: their records differ
        assert value(sat, "act_std", "model.layer1.0.relu", step) != value(
            sat, "act_std", "model.layer1.0.relu-2", step
        )
    # each layer's size, the values it made at the first step
    assert sat.layer_sizes["model.layer1.0.relu"] == outputs[0][0][1].numel()


@pytest.mark.parametrize(
    ("library", "name", "pixels"),
    [
        ("torchvision", "resnet18", 32),
        ("torchvision", "mobilenet_v3_small", 64),
        ("timm", "convnext_atto", 32),
        ("timm", "cspdarknet53", 64),
    ],
)
def test_standard_cnns_at_their_default_init_get_no_verdict(library, name, pixels):
    """A value's gradient in a 16 x 16 map and in a pooled vector are not comparable: at their default inits these
    healthy networks' first and last layers differ by 1,925x (ResNet-18 at 32 px), 0.077x and 0.068x, which the
    gradient-flow rules once called exploding and vanishing; CSPDarknet-53's residual branches end in a norm whose
    gain starts at 0, all its activation's values 0 (once said saturated)."""
    from lightning_netdiag import NetDiag
    from lightning_netdiag.rules.init import gradient_ratio_at_init

    lib = pytest.importorskip(library)
    torch.manual_seed(0)
    make = lib.models.get_model if library == "torchvision" else lib.create_model
    model = make(name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with NetDiag(model, optimizer, every_n_steps=1) as diag:
        loss = F.cross_entropy(model(torch.randn(2, 3, pixels, pixels)), torch.tensor([1, 2]))
        loss.backward()
        optimizer.step()
    records = diag.records()
    sizes = records["saturation"].layer_sizes
    assert len(set(sizes.values())) > 1
    assert gradient_ratio_at_init(records) is None
    assert report.summarize(**records).verdicts == []


# --- timm ----------------------------------------------------------------------------------------------


def test_timm_vit_and_efficientnet_watch_every_activation_and_weight(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    module = Wrap(vit)
    cbs = fit(tmp_path / "vit", module, images())
    assert names(cbs[0], "act_std") == {"model.blocks.0.mlp.act", "model.blocks.1.mlp.act"}
    assert_every_weight_measured(module, cbs)
    assert {"model.pos_embed", "model.cls_token", "model.patch_embed.proj.weight"} <= names(cbs[1], "grad_data_ratio")

    effnet = timm.create_model("efficientnet_b0", num_classes=10)
    expected = calls_of(effnet, (nn.SiLU, nn.Sigmoid, nn.ReLU, nn.GELU))
    module = Wrap(effnet)
    cbs = fit(tmp_path / "effnet", module, images())
    assert names(cbs[0], "act_std") == expected and len(expected) == 65
    assert {cbs[0].layer_families[n] for n in expected} == {"gelu", "sigmoid"}  # SiLU and the SE gates
    assert_every_weight_measured(module, cbs)
    # The SE gates' Sigmoids sit near 0.5 with a small std by design: not dead layers, not saturated gates.
    verdicts = report.evaluate(*(cb.record for cb in cbs))
    assert not [v for v in verdicts if v.check == "dead layer" or v.healthy.startswith("gates")]


# --- models written in the usual PyTorch style ------------------------------------------------------------


class TutorialCNN(nn.Module):
    """The PyTorch tutorial's CNN: every activation a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if self.training and torch.is_grad_enabled():
            h.retain_grad()
            self.seen.append(h)
        x = F.max_pool2d(h, 2)
        x = F.max_pool2d(self.conv2(x).relu(), 2)  # a method call: the second relu of this forward
        x = torch.tanh(self.fc1(torch.flatten(x, 1)))
        return F.relu(self.fc2(x), inplace=True)  # in place, the third


def test_tutorial_style_functional_cnn(tmp_path):
    torch.manual_seed(0)
    cnn = TutorialCNN()
    module = Wrap(cnn)
    steps: list[tuple] = []

    class Keep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            h = cnn.seen.pop()
            steps.append((h.detach().clone(), h.grad.clone()))

    cbs = all_callbacks(1)
    trainer(tmp_path, [*cbs, Keep()], logger=False, max_steps=STEPS, limit_val_batches=0).fit(module, images())
    sat = cbs[0]
    assert names(sat, "act_std") == {"model/relu", "model/relu-2", "model/relu-3", "model/tanh"}
    assert sat.layer_types["model/relu"] == "function" and sat.layer_kinds["model/tanh"] == "tanh"
    assert_every_weight_measured(module, cbs)
    for step, (h, g) in enumerate(steps):
        assert_lecture_numbers(sat, "model/relu", step, lecture_numbers([h], [g], lambda t: t <= 0, unit_dim=1))


class LectureStyle(L.LightningModule):
    """The lecture's notebook as a LightningModule: bare parameters, ``torch.tanh`` in forward."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2147483647)
        self.C = nn.Parameter(torch.randn(27, 10, generator=g))
        self.W1 = nn.Parameter(torch.randn(30, 200, generator=g) * 0.2)
        self.b1 = nn.Parameter(torch.randn(200, generator=g) * 0.01)
        self.W2 = nn.Parameter(torch.randn(200, 27, generator=g) * 0.01)
        self.b2 = nn.Parameter(torch.zeros(27))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        h = torch.tanh(self.C[x].view(len(x), -1) @ self.W1 + self.b1)
        h.retain_grad()
        self.seen.append(h)
        return h @ self.W2 + self.b2

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        h = self.seen.pop()
        self.ref = lecture_numbers([h.detach()], [h.grad], lambda t: t.abs() > 0.97, unit_dim=-1)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.refs = [*getattr(self, "refs", []), self.ref]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lecture_style_bare_parameters_and_torch_tanh(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randint(0, 27, (64, 3), generator=g), torch.randint(0, 27, (64,), generator=g)), 32
    )
    module = LectureStyle()
    sat, gd, up = fit(tmp_path, module, data)
    assert names(sat, "act_std") == {"tanh"}  # a call in the top-level forward: just the function's name
    assert names(gd, "grad_data_ratio") == names(up, "update_data_log10") == {"C", "W1", "W2"}
    for step, ref in enumerate(module.refs):
        assert_lecture_numbers(sat, "tanh", step, ref)


class Looped(L.LightningModule):
    """One Tanh module run 6 times per forward (a weight-tied loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for _ in range(6):
            x = self.act(self.lin(x))
        return F.cross_entropy(self.out(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_calls_beyond_max_calls_share_the_last_layer(tmp_path):
    from helpers import loader

    sat = SaturationMonitor(every_n_steps=1, max_calls=4)
    trainer(tmp_path, [sat], logger=False, max_steps=1, limit_val_batches=0).fit(Looped(), loader(batch_size=16))
    assert names(sat, "act_std") == {"act", "act-2", "act-3", "act-4"}
    histogram = {n: sat.history.histograms[f"netdiag/act/{n}"][0][1].total for n in ("act", "act-4")}
    assert histogram == {"act": 16 * 6, "act-4": 3 * 16 * 6}  # calls 4, 5 and 6 pooled


class Siren(L.LightningModule):
    """A user's elementwise activation of no known kind (SIREN's sine): watched, without saturation."""

    class Sine(nn.Module):
        def forward(self, x):
            return torch.sin(30 * x)

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(6, 8), self.Sine(), nn.Linear(8, 4)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.act(self.lin(x))
        self.seen.append(h.detach())
        return F.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unknown_elementwise_module_gets_moments_histograms_and_d2_but_no_saturation(tmp_path):
    from helpers import loader

    module = Siren()
    sat = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [sat], logger=False, max_steps=1, limit_val_batches=0).fit(module, loader())
    assert sat.layer_kinds == {"act": "unknown"} and sat.layer_families == {"act": None}
    assert names(sat, "act_std") == names(sat, "act_grad_std") == {"act"}
    assert not names(sat, "act_saturated_pct") and not names(sat, "act_dead_pct")
    assert value(sat, "act_std", "act", 0) == pytest.approx(module.seen[0].std().item(), rel=1e-5)
    assert sat.history.histograms["netdiag/act/act"][0][1].total == module.seen[0].numel()


def test_sampled_histograms_of_a_resnet_show_what_exact_ones_show():
    """The histograms of tensors above HIST_SAMPLE values are samples (stats.sample_stride): on ResNet-18's real
    activations and weight gradients, what a plot draws (each bin's share) and the quantiles a logger without
    histograms gets (as ranks among the exact values) stay within 0.01 of the exact ones."""
    tv = pytest.importorskip("torchvision")
    from lightning_netdiag import stats

    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    outputs = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    F.cross_entropy(model(torch.randn(8, 3, 64, 64)), torch.randint(0, 10, (8,))).backward()
    grads = [p.grad for p in model.parameters() if p.dim() == 4]
    bins = stats.log2_bins()
    sampled = 0
    for x in [*outputs, *grads]:
        exact = stats.Histogram(bins.edges, tuple(bins.counts(x).tolist()))
        got = stats.Histogram.of(stats.tensor_record(x, bins).tolist(), bins.edges)
        sampled += stats.sample_stride(tuple(x.shape)) > 1
        shares = torch.tensor(got.counts) / got.total - torch.tensor(exact.counts) / exact.total
        assert shares.abs().max() <= 0.01, tuple(x.shape)
        for q, at in zip(QS, got.quantiles(QS), strict=True):
            assert abs(rank(exact, at) - q) <= 0.01, (tuple(x.shape), q, at)
    assert sampled >= 10  # the test is about samples


QS = [0.05, 0.25, 0.5, 0.75, 0.95]


def rank(hist, value):
    """The share of a histogram's values below ``value`` (linear within a bin, as its quantiles are)."""
    bounds, below = hist.bounds, 0.0
    for i, c in enumerate(hist.counts):
        lo, hi = bounds[i], bounds[i + 1]
        if value >= hi:
            below += c
        elif value > lo:
            below += c * (value - lo) / (hi - lo)
    return below / hist.total
