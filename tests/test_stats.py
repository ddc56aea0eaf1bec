"""The pure-torch layer against direct formulas."""

import math

import pytest
import torch
from helpers import GRAD_EDGES, bin_counts

from lightning_netdiag import stats


def test_record_of_a_tensor_with_nonfinite_values(path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g) * 3
    x[0, 0], x[5, 3], x[9, 1] = math.nan, math.inf, -math.inf
    bins = stats.linear_bins(-2.0, 2.0)
    record = stats.tensor_record(x, bins)
    finite = x[torch.isfinite(x)].double()
    m = stats.Moments.of(record.tolist())
    assert (m.count, m.nonfinite) == (finite.numel(), 3)
    assert m.mean == pytest.approx(finite.mean().item(), rel=1e-6)
    assert m.std == pytest.approx(finite.std().item(), rel=1e-6)
    hist = stats.Histogram.of(record.tolist(), bins.edges)
    assert list(hist.counts) == bin_counts(x, [k / 16 for k in range(-32, 33)])


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, powers of two and their float neighbours, subnormals, extremes, non-finite."""
    base = torch.tensor(
        [0.0, -0.0, 2**-30, 2**-29, 2**10, 1.0, 0.5, 1e-40, 3e38, math.nan, math.inf, -math.inf], dtype=dtype
    )
    base = torch.cat([base, -base])
    up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    return torch.cat([base, base.nextafter(up), base.nextafter(down)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_log2_bins_equal_direct_comparisons_at_every_edge(dtype):
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-12, 4, 4000, dtype=torch.float64)
    x = torch.cat([(torch.randn(4000, generator=g, dtype=torch.float64) * scales).to(dtype), special_values(dtype)])
    bins = stats.log2_bins()
    hist = stats.Histogram.of(stats.tensor_record(x, bins).tolist(), bins.edges)
    assert hist.edges == tuple(GRAD_EDGES)
    assert list(hist.counts) == bin_counts(x.double(), GRAD_EDGES, by_magnitude=True)


@pytest.mark.parametrize(("low", "high", "width"), [(-1.0, 1.0, 1 / 32), (0.0, 1.0, 1 / 64), (0.0, 6.0, 1 / 8)])
def test_linear_bins_have_power_of_two_widths_and_equal_direct_comparisons(low, high, width):
    bins = stats.linear_bins(low, high)
    edges = [low + k * width for k in range(round((high - low) / width) + 1)]
    assert bins.edges == pytest.approx(edges, abs=0) and 48 <= len(edges) - 1 <= 96
    g = torch.Generator().manual_seed(1)
    on_edges = torch.tensor(edges)
    x = torch.cat(
        [torch.rand(5000, generator=g) * (high - low + 1) + low - 0.5, on_edges, on_edges.nextafter(on_edges - 1)]
    )
    hist = stats.Histogram.of(stats.tensor_record(x, bins).tolist(), bins.edges)
    assert list(hist.counts) == bin_counts(x, edges)


def test_records_add_up_across_parts_and_chunks(monkeypatch):
    x = torch.randn(1000, dtype=torch.float64)
    bins = stats.log2_bins()
    whole = stats.tensor_record(x, bins)
    parts = sum(stats.tensor_record(p, bins) for p in x.split(137))
    assert torch.allclose(whole, parts)
    assert stats.Moments.of(parts.tolist()).std == pytest.approx(x.std().item(), rel=1e-12)
    monkeypatch.setattr(stats, "_CHUNK", 100)  # a big tensor is reduced in chunks: the same record
    assert torch.allclose(stats.tensor_record(x, bins), whole)


@pytest.mark.parametrize("size", [66, 512, 512 * 300, stats._HISTC_KEYS])
def test_histc_counts_every_key_in_its_own_bin(size):
    """Keys at the centres of histc's bins are counted exactly where bincount counts them, up to the largest key
    count it is used for (both ends included)."""
    keys = torch.cat([torch.randint(0, size, (100_000,), generator=torch.Generator().manual_seed(size)),
                      torch.tensor([0, 1, size - 2, size - 1] * 3)]).to(torch.int32)  # fmt: skip
    assert torch.equal(stats._histc_count(keys, size), torch.bincount(keys, minlength=size).double())


def test_moments_keep_their_precision_far_from_zero(path):
    # A weight near 1 with a spread of 1e-4 (a norm layer's gain): sums of squares in float32 would lose it (on a GPU's
    # path they did: its std was 0).
    g = torch.Generator().manual_seed(2)
    x = 1 + 1e-4 * torch.randn(300_000, generator=g)
    m = stats.Moments.of(stats.tensor_record(x, None).tolist())
    assert m.std == pytest.approx(x.double().std().item(), rel=1e-6)


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


def test_dead_units_and_saturated_count():
    t = torch.tensor([[1.0, 0.1, -1.0], [1.0, 0.2, 0.5], [1.0, -1.0, 1.0]])
    mask = t.abs() > 0.97
    count = torch.tensor(9.0, dtype=torch.float64)
    for finite in (None, torch.isfinite(t)):
        saturated, alive = stats.saturation_extra(mask, finite, unit_dim=-1, count=count)
        assert saturated.item() == 6
        assert alive.tolist() == [0.0, 2.0, 1.0]  # unit 0 is saturated for every example: dead
    t[0, 2], t[1, 0], t[2, 1] = -math.inf, math.nan, 0.5  # not finite: neither saturated nor alive
    finite = torch.isfinite(t)
    saturated, alive = stats.saturation_extra(t.abs() > 0.97, finite, unit_dim=-1, count=finite.sum().double())
    assert saturated.item() == 3
    assert alive.tolist() == [0.0, 3.0, 1.0]


@pytest.mark.parametrize(
    "bins", [None, stats.log2_bins(), stats.linear_bins(-1.0, 1.0)], ids=["none", "log2", "linear"]
)
@pytest.mark.parametrize("divisor", [None, torch.tensor(1024.0)], ids=["plain", "divided"])
@pytest.mark.parametrize("group", [None, 100], ids=["one group", "groups of 100 values"])
def test_many_small_tensors_in_one_pass_equal_one_record_each(monkeypatch, bins, divisor, group):
    if group is not None:  # the tensors of 0, 3 and 16 values together, those of 100 and 185 each alone
        monkeypatch.setattr(stats, "_GROUP", group)
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(37, 5, generator=g) * 3,
        torch.empty(0),  # a parameter without a gradient
        torch.randn(100, generator=g, dtype=torch.float64) * 1e-5,
        torch.randn(4, 4, generator=g).half(),
        torch.randn(stats.SMALL + 1, generator=g),  # too large to batch: reduced alone
        torch.randn(3, generator=g).bfloat16(),
    ]
    xs[0][0, 0], xs[0][1, 1], xs[2][3] = math.nan, math.inf, -math.inf
    batched = stats.tensor_records(xs, bins, divisor)
    for x, got in zip(xs, batched, strict=True):
        expected = stats.tensor_record(x, bins, divisor=divisor)
        assert got.shape == expected.shape
        assert torch.equal(got[stats.NONFINITE :], expected[stats.NONFINITE :])  # counts are exact
        if x.numel():  # sums in another order, and in float64 where one of the batch is float64
            a, b = stats.Moments.of(got.tolist()), stats.Moments.of(expected.tolist())
            assert a.mean == pytest.approx(b.mean, abs=1e-6 * b.std) and a.std == pytest.approx(b.std, rel=1e-6)
    direct = xs[0][torch.isfinite(xs[0])].double()
    m = stats.Moments.of(batched[0].tolist())
    scale = 1.0 if divisor is None else 1024.0
    assert m.mean == pytest.approx(direct.mean().item() / scale) and m.std == pytest.approx(direct.std().item() / scale)


@pytest.mark.parametrize(
    "bins", [None, stats.log2_bins(), stats.linear_bins(-1.0, 1.0)], ids=["none", "log2", "linear"]
)
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("count", ["bincount", "_histc_count", "_index_add_count"])
@pytest.mark.host_path
def test_host_branch_and_sync_free_paths_give_equal_records(bins, nonfinite, count, monkeypatch):
    """On CPU a record assumes finite values and checks once on the host; on CUDA it cleans up without a
    host read. Both paths, for one tensor, chunked tensors and many small ones, give the same record, whichever
    way the histogram is counted (CUDA's histc, index_add_ in a graph)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(300, generator=g) * 0.3, torch.randn(stats.SMALL + 5, generator=g), torch.randn(7, generator=g)]
    if nonfinite:
        xs[0][3], xs[1][10], xs[2][0] = math.nan, math.inf, -math.inf
    monkeypatch.setattr(stats, "_CHUNK", 1000)  # the large tensor in several chunks
    cleanups = []
    for name in ("_device_moments", "_clean_group"):  # the paths without a host read
        real = getattr(stats, name)
        monkeypatch.setattr(stats, name, lambda *a, real=real, **k: cleanups.append(1) or real(*a, **k))
    host_path = [stats.tensor_record(x, bins) for x in xs] + stats.tensor_records(xs, bins)
    assert bool(cleanups) == nonfinite  # finite values never reach the clean-up on CPU
    monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    if count != "bincount":
        monkeypatch.setattr(stats, "_count", getattr(stats, count))
    sync_free = [stats.tensor_record(x, bins) for x in xs] + stats.tensor_records(xs, bins)
    for a, b in zip(host_path, sync_free, strict=True):
        assert torch.equal(a[stats.NONFINITE :], b[stats.NONFINITE :])  # counts are exact
        # float32 sums on the host (stats._host_heads, stats._fast_moments) and without a host read
        # (stats._device_moments), float64 where values are not finite or many are reduced together
        # (stats._clean_group): float32's precision, relative to the spread
        ma, mb = stats.Moments.of(a.tolist()), stats.Moments.of(b.tolist())
        assert ma.mean == pytest.approx(mb.mean, abs=1e-6 * mb.std) and ma.std == pytest.approx(mb.std, rel=1e-6)
    for x, record in zip(xs + xs, host_path, strict=True):
        finite = x[torch.isfinite(x)].double()
        m = stats.Moments.of(record.tolist())
        assert (m.count, m.nonfinite) == (finite.numel(), x.numel() - finite.numel())
        std = finite.std().item()  # float32 sums: a mean near 0 is as exact as the spread allows
        assert m.mean == pytest.approx(finite.mean().item(), abs=1e-6 * std) and m.std == pytest.approx(std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "case", ["normal", "large mean", "huge", "tiny", "zeros", "nonfinite"]
)  # the last five: taken in float64 instead
def test_large_tensor_moments_match_float64(dtype, case, path):
    """A record of a large CPU tensor comes from float32 sums and norms (stats._fast_moments), taken again about the
    mean where the mean dwarfs the spread (50 spreads here); where float32 would not be accurate (squares beyond its
    range, non-finite values) it is taken in float64 as before. Either way it matches a direct float64 computation. On a
    GPU's path (no host read) it is float64 throughout: before, its float32 sums gave an inf std for the huge values, 0
    for the tiny ones, and 5e-6 of the std off for the large mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 200, generator=g) * 0.02
    x = {"normal": x, "large mean": x + 1.0, "huge": x * 1e22, "tiny": x * 1e-25, "zeros": x * 0}.get(case, x)
    if case == "nonfinite":
        x[5, 7], x[9, 9] = math.nan, math.inf
    x = x.to(dtype)
    if dtype == torch.bfloat16 and case in ("huge", "tiny"):
        x = x.float()  # bf16 holds them, but this is about the float32 path
    expected = x[torch.isfinite(x)].double()
    fast = stats._fast_moments(x.reshape(-1)) is not None
    assert fast or case not in ("normal", "large mean") or dtype == torch.float64  # no float64 copy for these
    m = stats.Moments.of(stats.tensor_record(x, stats.log2_bins(), divisor=4.0).tolist())
    # float32 sums; float64 ones (on a GPU's path by pieces: a variance 1/2500 of the mean square keeps 1e-11 of it)
    rel = (1e-6 if fast else 1e-12) if path == "host" else 1e-10
    assert m.count == expected.numel() and m.nonfinite == x.numel() - expected.numel()
    assert m.mean == pytest.approx(expected.mean().item() / 4, rel=rel, abs=1e-7 * m.std)
    assert m.std == pytest.approx(expected.std().item() / 4, rel=rel, abs=1e-300)


def test_sample_stride_divides_no_dimension():
    assert stats.sample_stride((256, 256)) == 1  # up to HIST_SAMPLE values: all counted
    for shape in [(50257, 768), (8, 1024, 3072), (64, 256, 3, 3), (3 * 1031, 1031)]:
        p = stats.sample_stride(shape)
        assert all(p % k for k in range(2, p)) and all(d % p for d in shape), (shape, p)
        assert math.prod(shape) * stats.SAMPLE_BLOCK / p <= stats.HIST_SAMPLE


@pytest.mark.parametrize("host", [True, False], ids=["host", "sync-free"])
def test_histogram_of_a_large_tensor_is_a_scaled_sample(host, monkeypatch):
    """Above HIST_SAMPLE values the histogram counts runs of SAMPLE_BLOCK values every sample_stride, scaled to the
    tensor's size; each bin's share stays within a few standard errors of the exact one, the moments stay exact."""
    if not host:
        monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    g = torch.Generator().manual_seed(4)
    # columns of very different scales: a stride that divided the row's length would see one of them only
    x = torch.randn(1000, 768, generator=g) * torch.logspace(-4, 1, 768)
    x[0, :50] = math.nan  # in the sample of the sync-free path too
    bins = stats.log2_bins()
    record = stats.tensor_record(x, bins, divisor=2.0)
    hist = stats.Histogram.of(record.tolist(), bins.edges)
    finite = x[torch.isfinite(x)] / 2.0
    exact = bins.counts(finite)
    assert hist.total == pytest.approx(finite.numel(), rel=1e-3)  # the sample scaled by its stride
    share, expected = torch.tensor(hist.counts) / hist.total, exact / exact.sum()
    m = x.numel() * stats.SAMPLE_BLOCK / stats.sample_stride(tuple(x.shape))
    assert torch.all((share - expected).abs() <= 5 * (expected * (1 - expected) / m).sqrt() + 1e-9)
    assert stats.Moments.of(record.tolist()).std == pytest.approx(finite.double().std().item(), rel=1e-6)


def test_description_says_how_histograms_are_sampled():
    """Logged beside the numbers: a finished run's logs say which histograms are samples; older logs, none."""
    from lightning_netdiag.record import ActivationRecord, GradDataRecord

    for record_type in (ActivationRecord, GradDataRecord):
        assert record_type().describe()["histogram_sample"] == stats.HIST_SAMPLE
        old = record_type()
        old.load_description({k: v for k, v in record_type().describe().items() if k != "histogram_sample"})
        assert old.histogram_sample is None


def test_the_gpu_path_never_reads_the_host(monkeypatch):
    """Where a host read would wait for a GPU (stats.host_reads_free false), no record reads a value, whatever
    its size, dtype, divisor (a tensor: a loss scale) or non-finite values: checked on the CPU by making every
    read fail, with a GPU's chunk size."""
    monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    monkeypatch.setattr(stats, "launch_bound", lambda device: True)
    monkeypatch.setattr(stats, "_GPU_CHUNK", 1 << 17)
    g = torch.Generator().manual_seed(5)
    xs = [
        torch.randn(700, 400, generator=g),
        torch.randn(300, 200, generator=g).bfloat16(),
        torch.randn(50, generator=g),
    ]
    xs[0][3, 3] = math.nan
    bins = stats.log2_bins()
    finite = [x[torch.isfinite(x)].double() for x in xs]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"a host read: {name}"))
    records = [stats.tensor_record(x, bins, divisor=torch.tensor(2.0)) for x in xs]
    records += stats.tensor_records(xs, stats.linear_bins(-1, 1), divisor=4.0)
    monkeypatch.undo()
    for x, record, direct in zip(xs + xs, records, finite + finite, strict=True):
        got = stats.Moments.of(record.tolist())
        assert got.count == direct.numel() and got.nonfinite == x.numel() - direct.numel()
        scale = 2.0 if len(record) == stats.record_size(bins) else 4.0
        assert got.std == pytest.approx(direct.std().item() / scale, rel=1e-6), tuple(x.shape)
        assert got.mean == pytest.approx(direct.mean().item() / scale, abs=1e-6 * got.std)


def test_a_strided_view_is_recorded_as_its_values():
    """A 1-D view with a stride (reshape keeps it strided) is read as its own values: rows and samples need them
    contiguous."""
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(6))[::2]
    record = stats.tensor_record(x, stats.log2_bins())
    m = stats.Moments.of(record.tolist())
    assert m.count == x.numel() and m.std == pytest.approx(x.double().std().item(), rel=1e-6)
    assert stats.Histogram.of(record.tolist(), stats.log2_bins().edges).total == pytest.approx(x.numel())


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("divisor", [None, 4.0])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("shape", [(32, 100), (32, 64)])
@pytest.mark.parametrize("nan", [True, False])
def test_records_leave_their_tensors_untouched(monkeypatch, host, divisor, count, shape, nan):
    """A record may overwrite a temporary of its own with the histogram's keys, never the tensors it reads: one small
    tensor whose values fill whole pieces (32 x 64: two of 1,024) is flattened as a view of itself, and a weight's
    gradient so overwritten was what the optimizer then stepped with."""
    if not host:
        monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(*shape, generator=g) for _ in range(count)] + [torch.randn(stats.SMALL + 1, generator=g)]
    if nan:
        xs[0][0, 0] = math.nan
    before = [x.clone() for x in xs]
    stats.tensor_records(xs, stats.log2_bins(), divisor)
    stats.tensor_records(xs[:1], stats.log2_bins(), divisor)
    for x in xs:
        stats.tensor_record(x, stats.log2_bins(), divisor)
    for x, b in zip(xs, before, strict=True):
        assert torch.equal(x.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("n", [0, 7, 300, 1024, 5000, 65521, 3 * 4096 + 256])
def test_row_squares_of_any_length_match_float64(monkeypatch, n):
    """Pieces that tile a row, else whole pieces of _ROW and the rest: never one float32 running sum of a long row."""
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(3, n, generator=g) + 1.0
    expected = rows.double().square().sum(1)
    lengths, norm = [], torch.linalg.vector_norm

    def counted(v, dim=None):
        lengths.append(v.numel() if dim is None else v.shape[dim])
        return norm(v, dim=dim)

    monkeypatch.setattr(torch.linalg, "vector_norm", counted)
    assert torch.allclose(stats.row_squares(rows), expected, rtol=1e-6, atol=0)  # float32 norms of <= 1,024 values
    total, squares = stats.sum_and_squares(rows[1]).tolist()
    assert squares == pytest.approx(expected[1].item(), rel=1e-6)
    assert total == pytest.approx(rows[1].double().sum().item(), rel=1e-6)
    assert max(lengths) <= stats._ROW


@pytest.mark.parametrize("n", [1, 7, 1024, 5000, 65521, 3 * 4096 + 256])
def test_device_moments_of_any_length_match_float64(n):
    """Without a host read (a GPU's path): the finite values counted, summed and squared in float64, the others
    counted, against a direct float64 computation, whatever the length."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) + 1.0
    x[:: max(n // 5, 1)] = math.nan
    x[n // 2] = -math.inf
    ok = torch.isfinite(x)
    finite = x[ok].double()
    count, total, squares, others = stats._device_moments(x).tolist()
    assert (count, others) == (finite.numel(), n - finite.numel())
    assert total == pytest.approx(finite.sum().item(), rel=1e-12, abs=1e-12)
    assert squares == pytest.approx(finite.square().sum().item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("divisor", [None, 3.0])
def test_many_tensors_together_without_a_host_read_equal_each_alone(monkeypatch, divisor):
    """On a GPU's path (no host read) tensors of up to stats._GROUP_VALUES values are reduced together: every count
    equals the tensor's own record (its histogram the same sample, scaled alike), the moments a direct float64
    computation's, for every size (empty, a few values, sampled ones, one piece exactly), dtype and non-finite value,
    in groups split by the limit."""
    monkeypatch.setattr(stats, "host_reads_free", lambda x: False)
    monkeypatch.setattr(stats, "_GROUP_VALUES", 300_000)  # one tensor alone, and two groups
    g = torch.Generator().manual_seed(8)
    shapes = [(0,), (), (7,), (1024,), (300, 301), (64, 3, 7, 7), (5000,), (2, 70_001), (400_000,), (1, 1)]
    xs = [torch.randn(s, generator=g) * (k + 1) + k for k, s in enumerate(shapes)]
    xs[2] = xs[2].bfloat16()
    xs[6] = xs[6].double()
    xs[4][0, 0], xs[5][1, 2, 3, 4], xs[7][1, 9] = math.nan, math.inf, -math.inf
    for bins in (stats.log2_bins(), stats.linear_bins(-2.0, 2.0)):
        together = stats.tensor_records(xs, bins, divisor)
        for x, got in zip(xs, together, strict=True):
            alone = stats.tensor_record(x, bins, divisor=divisor)
            assert torch.equal(got[stats.NONFINITE :], alone[stats.NONFINITE :])
            finite = x[torch.isfinite(x)].double() / (divisor or 1.0)
            count, total, squares = got[: stats.NONFINITE].tolist()
            assert count == finite.numel()  # float64 sums, together and alone
            assert total == pytest.approx(finite.sum().item(), rel=1e-9, abs=1e-9)
            assert squares == pytest.approx(finite.square().sum().item(), rel=1e-9, abs=1e-9)


def test_many_tensors_together_launch_as_few_kernels_as_one(path):
    """The point of reducing tensors together: the ops a group dispatches (each a launch on a GPU) do not grow with
    the number of its tensors, on the host and on a GPU's path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns  # views launch nothing
            if not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
                self.ops += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(9)
    bins = stats.log2_bins()
    launches = []
    for k in (2, 40):
        xs = [torch.randn(100 + 37 * i, 90, generator=g) for i in range(k)]
        stats._grouped_records(xs, bins)  # the layout, made once for these shapes
        with Count() as counted:
            stats._grouped_records(xs, bins)
        launches.append(counted.ops)
    assert launches[0] == launches[1] < 35
