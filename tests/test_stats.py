"""The pure-torch layer against direct formulas."""

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_netdiag import stats


def test_record_of_a_tensor_with_nonfinite_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g) * 3
    x[0, 0], x[5, 3], x[9, 1] = math.nan, math.inf, -math.inf
    edges = stats.linear_edges(-2.0, 2.0, 8)
    record = stats.tensor_record(x, edges)
    finite = x[torch.isfinite(x)].double()
    m = stats.Moments.of(record.tolist())
    assert (m.count, m.nonfinite) == (finite.numel(), 3)
    assert m.mean == pytest.approx(finite.mean().item(), rel=1e-6)
    assert m.std == pytest.approx(finite.std().item(), rel=1e-6)
    hist = stats.Histogram.of(record.tolist(), edges.tolist())
    bounds = [-math.inf, *edges.tolist(), math.inf]
    assert list(hist.counts) == [float(((finite >= a) & (finite < b)).sum()) for a, b in itertools.pairwise(bounds)]


def test_records_add_up_across_parts():
    x = torch.randn(1000, dtype=torch.float64)
    edges = stats.symlog_edges()
    whole = stats.tensor_record(x, edges)
    parts = sum(stats.tensor_record(p, edges) for p in x.split(137))
    assert torch.allclose(whole, parts)
    assert stats.Moments.of(parts.tolist()).std == pytest.approx(x.std().item(), rel=1e-12)


def test_symlog_edges_cover_twelve_decades_both_signs():
    e = stats.symlog_edges()
    assert e.numel() == 98 and torch.all(e[1:] > e[:-1])
    assert e[49].item() == pytest.approx(1e-9) and e[-1].item() == pytest.approx(1e3)


def test_quantiles_of_uniform_counts():
    h = stats.Histogram(edges=(0.0, 1.0, 2.0, 3.0, 4.0), counts=(0, 10, 10, 10, 10, 0))
    assert h.quantiles([0.0, 0.25, 0.5, 0.9]) == pytest.approx([0.0, 1.0, 2.0, 3.6])
    assert all(math.isnan(q) for q in stats.Histogram((0.0, 1.0), (0, 0, 0)).quantiles([0.5]))


def test_moments_of_a_single_value_have_no_std():
    m = stats.Moments.of([1.0, 2.0, 4.0, 0.0])
    assert m.mean == 2.0 and math.isnan(m.std)


@pytest.mark.parametrize(("num", "den", "expected"), [(1e-3, 1.0, -3.0), (0.0, 1.0, math.nan), (1.0, 0.0, math.nan)])
def test_ratio_log10_never_infinite(num, den, expected):
    got = stats.ratio_log10(num, den)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


ACTIVATIONS = [
    nn.Tanh(), nn.Softsign(), nn.Hardtanh(), nn.ReLU6(), nn.Sigmoid(), nn.Hardsigmoid(), nn.ReLU(), nn.LeakyReLU(),
    nn.ELU(), nn.CELU(alpha=2.0), nn.SELU(), nn.Softplus(beta=2.0), nn.LogSigmoid(), nn.Hardshrink(),
    nn.Softshrink(), nn.GELU(), nn.Hardswish(), nn.SiLU(), nn.Mish(),
]  # fmt: skip


@pytest.mark.parametrize("module", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_saturated_means_nearly_zero_derivative(module):
    """Wherever a rule says saturated, autograd's derivative is at most 0.06 (tanh at |t| = 0.97 has 0.059)."""
    x = torch.linspace(-40, 40, 80001, requires_grad=True)
    t = module(x)
    (slope,) = torch.autograd.grad(t.sum(), x)
    rule = stats.saturation_rule(module)
    assert rule is not None and isinstance(module, stats.ACTIVATION_TYPES)
    mask = rule.mask(x.detach() if rule.on_input else t.detach())
    assert 0 < mask.float().mean() < 1, "the rule marks part of the range"
    assert slope[mask].abs().max() <= 0.06
    assert slope[~mask].abs().max() > 0.1  # and what it leaves out is not flat (Hardsigmoid: 1/6)


def test_tanh_rule_is_the_lectures():
    t = torch.tensor([-0.99, -0.97, 0.0, 0.969, 0.971])
    assert stats.saturation_rule(nn.Tanh()).mask(t).tolist() == [True, False, False, False, True]
    assert stats.saturation_rule(nn.Tanh(), threshold=0.5).mask(t).tolist() == [True, True, False, True, True]


def test_leaky_variants_use_the_low_slope_side():
    for m in (nn.PReLU(), nn.RReLU()):
        assert stats.saturation_rule(m).mask(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [True, True, False]


def test_unknown_module_has_no_rule():
    assert stats.saturation_rule(nn.Linear(2, 2)) is None


def test_dead_units_and_saturated_count():
    t = torch.tensor([[1.0, 0.1, -1.0], [1.0, 0.2, 0.5], [1.0, -1.0, 1.0]])
    mask = t.abs() > 0.97
    saturated, alive = stats.saturation_extra(mask, torch.isfinite(t), unit_dim=-1)
    assert saturated.item() == 6
    assert alive.tolist() == [0.0, 2.0, 1.0]  # unit 0 is saturated for every example: dead
