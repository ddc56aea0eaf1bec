"""Attention logits, output logits and Adam's state, each against a direct computation: the fused attention's
largest logit with every mask form, every attention call of real models (hand-written eager and fused,
transformers' GPT-2, LLaMA with grouped-query heads and BERT with padding, ``nn.MultiheadAttention``), the
output's log Z over micro-batches, and the normalised Adam step with and without amsgrad."""

import math
import re

import lightning as L
import pytest
import torch
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_netdiag import NetDiag
from lightning_netdiag.attention import query_blocks, score_stats, sdpa_scores

ONLY_LOGITS = dict(saturation=False, grad_data=False, update=False, optimizer_state=False)


def direct_sdpa_scores(q, k, mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """The scores SDPA's softmax sees, all at once in float64 (masked: -inf)."""
    q, k = q.double(), k.double()
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return s


def direct_sdpa_max(*args, **kwargs) -> float:
    return direct_sdpa_scores(*args, **kwargs).max().item()


def direct_entropy(scores: torch.Tensor) -> float:
    """The mean over rows of H(softmax(row)) / log(keys with a weight), rows with one such key left out, from the
    whole score tensor in float64: masked keys (-inf, or the float32 minimum) get a weight of exactly 0."""
    p = torch.softmax(scores.double(), -1)
    keys = (p > 0).sum(-1)
    h = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
    counted = keys > 1
    return (h[counted] / keys[counted].double().log()).mean().item()


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal, fewer queries than keys": dict(is_causal=True, queries=5),
    "padding mask": dict(mask="padding"),
    "full boolean mask": dict(mask="bool"),
    "float mask": dict(mask="float"),
    "grouped-query heads": dict(enable_gqa=True, kv_heads=2),
    "custom scale": dict(scale=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block", [2**22, 40])  # in one block, and over many query blocks
def test_fused_logit_max_and_entropy_are_exact(case, block):
    o = dict(CASES[case])
    g = torch.Generator().manual_seed(0)
    b, h, length, keys, d = 2, 4, o.pop("queries", 9), 9, 8
    q = torch.randn(b, h, length, d, generator=g) * 3
    k = torch.randn(b, o.pop("kv_heads", h), keys, d, generator=g)
    v = torch.randn(k.shape, generator=g)
    mask = o.pop("mask", None)
    if mask == "padding":  # the last keys of the second example are padding
        mask = torch.ones(b, 1, 1, keys, dtype=torch.bool)
        mask[1, ..., -3:] = False
    elif mask == "bool":
        mask = torch.rand(b, 1, length, keys, generator=g) > 0.3
        mask[..., 0] = True
    elif mask == "float":
        mask = torch.randn(b, h, length, keys, generator=g)
    # what SDPA computes is what the direct reference assumes it computes
    want = direct_sdpa_max(q, k, mask, **o)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **o)
    kk = k.repeat_interleave(h // k.shape[1], dim=1) if o.get("enable_gqa") else k
    s = q.double() @ kk.double().transpose(-2, -1) * o.get("scale", 1 / math.sqrt(d))
    if o.get("is_causal"):
        s = s.masked_fill(~torch.ones(length, keys, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    vv = v.repeat_interleave(h // v.shape[1], dim=1) if o.get("enable_gqa") else v
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ vv.double(), atol=1e-5, rtol=1e-5)
    blocks = sdpa_scores(q, k, mask, o.get("is_causal", False), o.get("scale"), o.get("enable_gqa", False), block)
    peak, entropy, rows = score_stats(blocks).tolist()
    assert peak == pytest.approx(want, rel=1e-6)
    assert entropy / rows == pytest.approx(direct_entropy(direct_sdpa_scores(q, k, mask, **o)), rel=1e-5)


# --- every attention call of real models -------------------------------------------------------------------


class HandAttention(nn.Module):
    """Causal self-attention written out (eager) or through SDPA (fused)."""

    def __init__(self, fused: bool, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.fused, self.heads = fused, heads
        self.bf16_softmax = False  # eager: the softmax of the scores rounded to bf16
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def qk(self, x):
        b, t, c = x.shape
        return [z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(c, dim=2)]

    def forward(self, x):
        q, k, v = self.qk(x)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
            y = F.softmax(s.bfloat16() if self.bf16_softmax else s, dim=-1).float() @ v
        return self.proj(y.transpose(1, 2).flatten(2))


class HandLM(nn.Module):
    def __init__(self, fused: bool, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, 16)
        with torch.no_grad():
            self.wte.weight.mul_(4.0)  # logits well away from 0
        self.blocks = nn.ModuleList(HandAttention(fused) for _ in range(2))
        self.head = nn.Linear(16, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def run_steps(model, batches, loss_of, optimizer=None, every=1, accumulate=1, **meters):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2)
    diag = NetDiag(model, optimizer, every_n_steps=every, **{**ONLY_LOGITS, **meters})
    with diag:
        for i, batch in enumerate(batches):
            (loss_of(model, batch) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad()
    return diag


@pytest.mark.parametrize("fused", [False, True])
def test_hand_written_attention(fused):
    model = HandLM(fused)
    x = torch.randint(0, 11, (4, 7))
    want = {}
    for name in ("blocks.0", "blocks.1"):  # the step-0 forward, computed directly before any update
        block = model.get_submodule(name)
        h = model.wte(x) if name == "blocks.0" else model.wte(x) + model.blocks[0](model.wte(x))
        q, k, _ = block.qk(h)
        want[name] = (
            direct_sdpa_max(q, k, is_causal=True),
            direct_entropy(direct_sdpa_scores(q, k, is_causal=True)),
            q.pow(2).mean().sqrt().item(),
            k.pow(2).mean().sqrt().item(),
        )
    want_out = model(x).detach().double()
    diag = run_steps(model, [x], lambda m, b: F.cross_entropy(m(b).flatten(0, 1), b.flatten()))
    record = diag.logits.record
    assert record.names("attn_logit_max") == ["blocks.0", "blocks.1"]
    assert record.attention_kinds == dict.fromkeys(want, "fused" if fused else "eager")
    for name, (peak, entropy, q_rms, k_rms) in want.items():
        assert record.value("attn_logit_max", 0, name) == pytest.approx(peak, rel=1e-5)
        assert record.value("attn_entropy", 0, name) == pytest.approx(entropy, rel=1e-5)
        assert record.value("attn_q_rms", 0, name) == pytest.approx(q_rms, rel=1e-5)
        assert record.value("attn_k_rms", 0, name) == pytest.approx(k_rms, rel=1e-5)
    assert record.output == "head" and record.unwatched == set()
    assert record.value("output_logz", 0, "head") == pytest.approx(
        torch.logsumexp(want_out, -1).mean().item(), rel=1e-6
    )
    assert record.value("output_logit_max", 0, "head") == pytest.approx(want_out.max().item(), rel=1e-6)


class DirectAttention(TorchFunctionMode):
    """Keeps each attention call's scores computed directly (the whole score tensor at once, in float64): the
    reference. Entered around the run, it sees every call after netdiag's own mode has."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            o = dict(zip(names, args[3:], strict=False)) | kwargs
            self.seen.append(direct_sdpa_scores(args[0], args[1], o.get("attn_mask"), o.get("is_causal", False),
                                                o.get("scale"), o.get("enable_gqa", False)))  # fmt: skip
        elif func is F.softmax and args[0].dim() >= 3 and args[0].shape[-1] == args[0].shape[-2]:
            self.seen.append(args[0].detach().double())
        return func(*args, **kwargs)


def test_entropy_from_the_models_softmax_is_the_same():
    """An eager attention's own softmax, handed over, gives the entropy its scores give (masked keys included)."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 3, 9, 9, generator=g) * 4).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    given = score_stats(query_blocks(s, 40), query_blocks(torch.softmax(s, -1), 40))
    torch.testing.assert_close(given, score_stats(query_blocks(s, 40)), rtol=1e-6, atol=0)
    assert given[1] / given[2] == pytest.approx(direct_entropy(s), rel=1e-5)
    # no queries: one empty block, nothing counted, on the scores' device
    assert score_stats(query_blocks(s[..., :0, :])).tolist() == [-math.inf, 0.0, 0.0]


def test_a_half_precision_softmax_is_not_where_the_entropy_is_read():
    """A softmax in bf16 (its weights to three digits): the entropy is computed again from its scores."""
    model = HandLM(fused=False)
    for block in model.blocks:
        block.bf16_softmax = True
    x = torch.randint(0, 11, (4, 7))
    with DirectAttention() as direct:
        diag = run_steps(model, [x], lambda m, b: F.cross_entropy(m(b).flatten(0, 1), b.flatten()))
    record = diag.logits.record
    assert [record.value("attn_entropy", 0, n) for n in ("blocks.0", "blocks.1")] == pytest.approx(
        [direct_entropy(s) for s in direct.seen], rel=1e-5
    )


def _hf(kind: str, impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=50, attn_implementation=impl)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=4, **common)
        return transformers.GPT2LMHeadModel(cfg), "transformer.h.{}.attn", "lm_head"
    if kind == "llama":  # grouped-query heads: 4 query heads share 2 key/value heads
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=16, **common)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg), "model.layers.{}.self_attn", "lm_head"
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=16, **common)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), "bert.encoder.layer.{}.attention.self", "classifier"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_transformers_attention(kind, impl):
    model, layer, head = _hf(kind, impl)
    model.train()
    x = torch.randint(0, 50, (3, 10))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # padding: the masked keys must not count
    labels = torch.tensor([0, 1, 0]) if kind == "bert" else x

    def loss_of(m, b):
        return m(input_ids=b, attention_mask=mask, labels=labels).loss

    with DirectAttention() as direct:
        diag = run_steps(model, [x], loss_of)
    seen = direct.seen
    record = diag.logits.record
    names = [layer.format(i) for i in range(2)]
    assert record.names("attn_logit_max") == names
    assert [record.value("attn_logit_max", 0, n) for n in names] == pytest.approx(
        [s.max().item() for s in seen], rel=1e-5
    )
    # padding: a masked key has no weight, and the softmax's rows are as uniform as their keys allow at init
    assert [record.value("attn_entropy", 0, n) for n in names] == pytest.approx(
        [direct_entropy(s) for s in seen], rel=1e-5
    )
    assert record.attention_kinds == dict.fromkeys(names, "fused" if impl == "sdpa" else "eager")
    assert record.unwatched == set() and record.output == head


@pytest.mark.parametrize("padding", [False, True])
def test_multihead_attention_modules(padding):
    """``nn.MultiheadAttention`` (one torch function for the whole attention: q and k projected again), alone
    with a key-padding mask and inside ``nn.TransformerEncoderLayer`` with a causal mask."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x, pad, causal):
            h = self.mha(x, x, x, key_padding_mask=pad)[0]
            return self.head(self.layer(h, src_mask=causal, is_causal=True))

    def direct(mha, x, pad, causal):
        """q @ k.T / sqrt(d) from the module's weights, masked, in float64."""
        w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
        q, k = (F.linear(x.double(), w[i * 16 : (i + 1) * 16], b[i * 16 : (i + 1) * 16]) for i in (0, 1))
        q, k = (t.view(2, 5, 4, 4).transpose(1, 2) for t in (q, k))
        s = q @ k.transpose(-2, -1) / 2.0
        if pad is not None:
            s = s.masked_fill(pad[:, None, None, :], -math.inf)
        if causal is not None:
            s = s + causal.double()
        return s

    model = Encoder()
    x = torch.randn(2, 5, 16) * 3
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padding else None
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        want = [
            direct(model.mha, x, pad, None),
            direct(model.layer.self_attn, model.mha(x, x, x, key_padding_mask=pad)[0], None, causal),
        ]
    record = run_steps(model, [x], lambda m, b: m(b, pad, causal).pow(2).mean()).logits.record
    names = record.names("attn_logit_max")
    assert names == ["mha", "layer.self_attn"] and record.unwatched == set()
    assert [record.value("attn_logit_max", 0, n) for n in names] == pytest.approx(
        [s.max().item() for s in want], rel=1e-5
    )
    assert [record.value("attn_entropy", 0, n) for n in names] == pytest.approx(
        [direct_entropy(s) for s in want], rel=1e-5
    )


def test_attention_it_cannot_see_is_listed():
    """An attention module whose softmax is no softmax call (a custom kernel stands in) is listed, not skipped."""

    class KernelAttention(nn.Module):
        def forward(self, x):
            s = x @ x.transpose(-2, -1)
            e = torch.exp(s - s.amax(-1, keepdim=True))
            return (e / e.sum(-1, keepdim=True)) @ x

    model = nn.Sequential(nn.Linear(4, 4), KernelAttention(), nn.Linear(4, 2))
    record = run_steps(model, [torch.randn(3, 5, 4)], lambda m, b: m(b).pow(2).mean()).logits.record
    assert record.unwatched == {"1"} and record.names("attn_logit_max") == []


def test_an_overflowing_attention_is_said_so_and_named_by_the_report():
    """Scores beyond float32's range (as fp16's logits above 65504) are recorded as non-finite, never dropped,
    and count for the attention rule (the run's loss is NaN by then: the non-finite rule fires too)."""
    from lightning_netdiag.report import summarize

    model = HandLM(fused=False)
    with torch.no_grad():
        model.wte.weight.mul_(1e19)  # q . k beyond 3.4e38
    x = torch.randint(0, 11, (4, 7))
    loss_of = lambda m, b: F.cross_entropy(m(b).flatten(0, 1), b.flatten())  # noqa: E731
    diag = run_steps(model, [x] * 3, loss_of, torch.optim.SGD(model.parameters(), lr=0.0))
    record = diag.logits.record
    assert record.names("attn_logit_nonfinite") == ["blocks.0", "blocks.1"] and record.names("attn_logit_max") == []
    verdicts = summarize(logits=record).verdicts  # infinite: far past its line, it counts at the first step
    assert [(v.check, v.value, v.steps) for v in verdicts] == [("attention logits growing", math.inf, "since 0")]


def test_qk_norm_is_seen_where_it_is():
    """A q/k norm layer counts (the report never advises what the model has); an Identity in its place does not."""
    from lightning_netdiag.attention import has_qk_norm

    class Attention(nn.Module):
        def __init__(self, norm: bool) -> None:
            super().__init__()
            self.q_norm = nn.LayerNorm(8) if norm else nn.Identity()
            self.k_norm = nn.LayerNorm(8) if norm else nn.Identity()

    assert has_qk_norm(Attention(True)) and not has_qk_norm(Attention(False))


def test_the_report_says_which_attention_it_could_not_watch():
    from lightning_netdiag.report import summarize

    class KernelAttention(nn.Module):
        def forward(self, x):
            return torch.ops.aten.relu(x)  # stands in for a kernel no function mode sees

    model = nn.Sequential(nn.Linear(4, 4), KernelAttention(), nn.Linear(4, 2))
    diag = run_steps(model, [torch.randn(3, 4)], lambda m, b: m(b).pow(2).mean())
    notes = summarize(logits=diag.logits.record).notes
    assert any(n.startswith("attention not watched in 1: it runs in a kernel") for n in notes), notes


def test_output_logits_over_micro_batches():
    """The output's mean log Z and largest logit over both micro-batches of each measured step."""
    model = HandLM(fused=True)
    batches = [torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    want = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # the same run without netdiag: the outputs of each step's micro-batches
    reference = HandLM(fused=True)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i, b in enumerate(batches):
        z = reference(b)
        want.setdefault(i // 2, []).append(z.detach().double().flatten(0, 1))
        (F.cross_entropy(z.flatten(0, 1), b.flatten()) / 2).backward()
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
    loss_of = lambda m, b: F.cross_entropy(m(b).flatten(0, 1), b.flatten())  # noqa: E731
    record = run_steps(model, batches, loss_of, optimizer, every=2, accumulate=2).logits.record
    assert record.steps == [0, 2]
    for step in (0, 2):
        z = torch.cat(want[step])
        assert record.value("output_logz", step, "head") == pytest.approx(
            torch.logsumexp(z, -1).mean().item(), rel=1e-5
        )
        assert record.value("output_logit_max", step, "head") == pytest.approx(z.max().item(), rel=1e-5)


# --- Adam's state ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amsgrad, group, on_device",
    [(False, None, False), (True, None, False), (False, 100, False), (False, None, True), (True, 100, True)],
)
def test_adam_state(amsgrad, group, on_device, monkeypatch):
    if group is not None:  # each weight's moments in a foreach call of their own (192 and 96 values)
        monkeypatch.setattr("lightning_netdiag.meters.optimizer._GROUP", group)
    if on_device:  # a fused AdamW's step count as a GPU's is: a tensor the host does not read (bias corrections
        # as 0-dim tensors in the foreach calls), the path of a fused or capturable Adam on a GPU, run on the CPU
        monkeypatch.setattr("lightning_netdiag.meters.optimizer._on_host", lambda step: False)
        monkeypatch.setattr("lightning_netdiag.stats.launch_bound", lambda device: True)  # one foreach norm
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or t.tolist())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    eps = 1e-5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=eps, amsgrad=amsgrad, fused=on_device)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    x[:, :2] = 0  # the first layer's weights on these inputs get no gradient: there eps sets the step
    diag = NetDiag(model, optimizer, every_n_steps=3, saturation=False, grad_data=False, update=False, logits=False)
    with diag:
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if diag.steps == 4:  # step 3 was measured just now: read the state as the meter did
                state = {n: optimizer.state[p] for n, p in model.named_parameters()}
    steps = {id(s["step"]) for s in state.values()}
    assert any(id(t) in steps for t in reads) is not on_device  # the step counts read on the host, or not at all
    monkeypatch.undo()
    record = diag.optimizer_state.record
    assert record.steps == [0, 3] and record.optimizer_family == "adam" and record.eps == eps
    assert record.names("adam_step_rms") == ["0.weight", "2.weight"]
    for name in ("0.weight", "2.weight"):
        s = state[name]
        t = s["step"].item()
        m = s["exp_avg"].double() / (1 - 0.9**t)
        v = (s["max_exp_avg_sq"] if amsgrad else s["exp_avg_sq"]).double() / (1 - 0.999**t)
        u = m / (v.sqrt() + eps)
        assert record.value("adam_step_rms", 3, name) == pytest.approx(u.pow(2).mean().sqrt().item(), rel=1e-5)
        assert record.value("adam_eps_pct", 3, name) == pytest.approx(100 * (v.sqrt() < eps).double().mean().item())
    assert record.value("adam_eps_pct", 3, "0.weight") == pytest.approx(100 / 3)  # both sides of eps exercised


def test_no_adam_no_state():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = run_steps(model, [torch.randn(8, 4)], lambda m, b: m(b).pow(2).mean(), optimizer, optimizer_state=True)
    assert diag.optimizer_state.record.steps == [] and diag.optimizer_state.record.optimizer_family == "sgd"


# --- every front end ---------------------------------------------------------------------------------------


class LitLM(L.LightningModule):
    """HandLM as a LightningModule (AdamW at a constant rate)."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = HandLM(fused=False)

    def forward(self, idx):
        return self.lm(idx)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]).flatten(0, 1), batch[0].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_logs_what_the_plain_loop_measures(tmp_path, accumulate):
    """LogitMonitor and OptimizerState under Lightning log (TensorBoard, read back) the plain loop's numbers on the
    same model and batches; ``netdiag report`` on those logs says what the live report said."""
    from helpers import read_tensorboard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_netdiag import DiagnosticPlots, HealthReport, LogitMonitor, OptimizerState
    from lightning_netdiag.cli import compare, health
    from lightning_netdiag.logs import load_run

    data = TensorDataset(torch.randint(0, 11, (48, 7), generator=torch.Generator().manual_seed(0)))
    health_cb = HealthReport(print_table=False)
    drawn = DiagnosticPlots(save_dir=str(tmp_path / "plots"))
    callbacks = [LogitMonitor(every_n_steps=2), OptimizerState(every_n_steps=2), health_cb, drawn]
    trainer = L.Trainer(
        max_steps=5, callbacks=callbacks, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"),
        accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(LitLM(), DataLoader(data, batch_size=8))
    model = LitLM()
    optimizer = model.configure_optimizers()
    loss_of = lambda m, b: m.training_step(b, 0)  # noqa: E731
    batches = (list(DataLoader(data, batch_size=8)) * 2)[: 5 * accumulate]  # epochs, as the Trainer runs them
    loop = run_steps(model, batches, loss_of, optimizer, every=2, accumulate=accumulate, optimizer_state=True)
    logged, _, acc = read_tensorboard(trainer.logger.log_dir)
    want = {tag: dict(m.history[tag]) for m in (loop.logits, loop.optimizer_state) for tag in m.history}
    assert {
        "netdiag/attn_logit_max/lm.blocks.1",
        "netdiag/attn_entropy/lm.blocks.1",
        "netdiag/output_logz/lm.head",
        "netdiag/adam_eps_pct/lm.wte.weight",
    } <= set(want)
    for tag, points in want.items():
        assert set(logged[tag]) == set(points) == {0, 2, 4}, tag
        for step, value in points.items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
    run = load_run(tmp_path / "tb" / "version_0")
    assert run.record("logits").attention_kinds == {"lm.blocks.0": "eager", "lm.blocks.1": "eager"}
    assert health(run).table() == health_cb.report.table()
    last = run.record("logits").at("attn_logit_max", 4)
    worst = max(last, key=last.__getitem__)
    assert f"| {last[worst]:.3g} ({worst}) |" in compare([run])  # netdiag compare: the largest attention logit
    assert "attention logits: largest" in health_cb.report.table()
    # the pictures: the largest attention logit, the softmax entropy and log Z over the steps, in files and on the
    # Custom Scalars page
    assert {"attention_logits.png", "attention_entropy.png", "output_logits.png", "adam_step.png"} <= {
        p.name for p in (tmp_path / "plots").rglob("*.png")
    }
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: c.chart for c in layout.category}
    for title, metric in (
        ("attention: largest logit", "attn_logit_max"),
        ("attention: softmax entropy (1 uniform, 0 one-hot)", "attn_entropy"),
        ("output logits: mean log Z", "output_logz"),
    ):
        regexes = [chart.multiline.tag[0] for chart in charts[f"netdiag: {title}"]]
        assert [t for t in logged if any(re.fullmatch(r, t) for r in regexes)] == [
            t for t in logged if t.startswith(f"netdiag/{metric}/")
        ]


def test_the_hugging_face_trainer_watches_attention(tmp_path):
    """NetDiagCallback with default arguments on a transformers GPT-2: its attentions and Adam's state."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    from lightning_netdiag.hf import NetDiagCallback

    class Tokens(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    model, _, _ = _hf("gpt2", "sdpa")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, logging_steps=2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = NetDiagCallback(print_report=False)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    logits, adam = callback.diag.logits.record, callback.diag.optimizer_state.record
    assert logits.steps == [0, 2] and logits.names("attn_logit_max") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert logits.output == "lm_head" and adam.optimizer_family == "adam" and adam.steps == [0, 2]
    assert all(0 < v <= 1.0 + 1e-6 for v in adam.at("adam_step_rms", 0).values())  # |m_hat / sqrt(v_hat)| = 1 at first
    # the softmaxes' entropy: a causal GPT-2 at init attends almost uniformly (1 uniform, 0 one-hot)
    assert logits.names("attn_entropy") == logits.names("attn_logit_max")
    assert all(0.9 < v <= 1.0 + 1e-6 for v in logits.at("attn_entropy", 0).values())
