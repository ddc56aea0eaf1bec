"""What a logging step launches: the ATen ops dispatched (each one a kernel launch on a GPU) and the reads of a
tensor's value by the host (each one a synchronisation on a GPU) that `NetDiag`, at its defaults, adds to a step of
GPT-2 124M's and ResNet-50's shapes, counted on the CPU (issue 35).

    python benchmarks/logging_step_ops.py                  # both models
    python benchmarks/logging_step_ops.py --models gpt2-124m
    python benchmarks/logging_step_ops.py --profile        # on a GPU: where a logging step's time goes

Each model trains 4 steps with AdamW (GPT-2: transformers' default config, 2 x 64 tokens; ResNet-50: torchvision's,
2 images of 224 px), bare and then with ``NetDiag(model, optimizer, writer, every_n_steps=2)`` writing TensorBoard
events to a temporary directory; step 2 is a logging step (not the first: step 0 also measures the network at
initialisation), step 3 a step between. The ops are counted by a ``TorchDispatchMode`` (every ATen op, the model's
and the optimizer's too: the table gives what netdiag adds), the host reads by wrapping the tensor methods that read
values (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``, ``numpy``, ``to`` the host): a
function mode would not see netdiag's own work, which runs past the function modes.

On the CPU a record reads the host where that is free (stats.host_reads_free): one read checks that a tensor's values
are finite and its float32 sums accurate. ``--as-gpu`` counts what a GPU launches and reads instead: it runs the
same steps on the CPU with netdiag taking its GPU paths (no host read in a record, a GPU's chunk and block sizes), and
counts as host reads only what would wait for a GPU: not a read of AdamW's step counts, which a GPU run keeps on the
host (bare and with netdiag alike).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"}


class Count(TorchDispatchMode):
    """Every ATen op dispatched while it is on, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if _is_view(func):
            self.views += 1
        return func(*args, **(kwargs or {}))


def _is_view(func) -> bool:
    """An op that returns a view of its input (detach, view, select, ...): it changes metadata on the host and
    launches no kernel. The table gives every op and, in brackets, those that launch one."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class Reads:
    """Every read of a tensor's value by the host while it is entered (by wrapping the tensor methods that read).

    ``.to`` the host counts only from another device (to the host from the host is no read), and ``on_host`` holds
    tensors that a GPU run keeps on the host, whose reads wait for nothing there (the ids of a non-fused,
    non-capturable Adam's step counts, with ``--as-gpu``)."""

    def __init__(self, on_host: frozenset[int] = frozenset()) -> None:
        self.reads = 0
        self.on_host = on_host
        self._saved: dict[str, Callable] = {}

    def __enter__(self) -> Reads:
        for name in (*READS, "to"):
            real = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, real))
        return self

    def _counted(self, name: str, real: Callable) -> Callable:
        def read(t, *args, **kwargs):
            to_cpu = name == "to" and any(str(a) == "cpu" for a in [*args, *kwargs.values()])
            to_host = to_cpu and t.device.type != "cpu"
            if (name in READS or to_host) and id(t) not in self.on_host:
                self.reads += 1
            return real(t, *args, **kwargs)

        return read

    def __exit__(self, *exc: object) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)


def build(name: str, device: str = "cpu") -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    """The model on ``device`` and a function of it that computes one step's loss on a fixed batch."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt2-124m":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0)).to(device)
        tokens = torch.randint(0, 50257, (2, 64), generator=g).to(device)
        return model, lambda m: m(tokens, labels=tokens).loss
    import torchvision

    model = torchvision.models.resnet50().to(device)
    x, y = torch.randn(2, 3, 224, 224, generator=g).to(device), torch.randint(0, 1000, (2,), generator=g).to(device)
    return model, lambda m: F.cross_entropy(m(x), y)


def count(name: str, with_netdiag: bool, gpu: bool = False) -> list[tuple[int, int, int]]:
    """(ops, ops that launch a kernel, host reads) of each of 4 steps."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import NetDiag, stats

    torch.manual_seed(0)
    model, loss_of = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = []
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        if gpu:
            stack.enter_context(stats.as_gpu())
        if with_netdiag:
            writer = SummaryWriter(logs)
            stack.callback(writer.close)
            stack.enter_context(NetDiag(model, optimizer, writer, every_n_steps=2))
        for _ in range(4):
            # on a GPU, torch's AdamW (not fused, not capturable) keeps its step counts on the host
            on_host = frozenset(id(s["step"]) for s in optimizer.state.values() if gpu and "step" in s)
            with Count() as ops, Reads(on_host) as reads:
                loss = loss_of(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total = sum(ops.ops.values())
            steps.append((total, total - ops.views, reads.reads))
    return steps


def profile(name: str, device: torch.device, timed: int = 6) -> str:
    """Where a logging step's time goes on ``device`` (with ``--profile``): the same model, batch and ``NetDiag`` as the
    count, 4 steps of warm-up, the median wall time of the timed logging steps and steps between (the device
    synchronised after each), then one logging step under torch.profiler: its ops with the most time of their own on
    the device (on a CPU, on the host), and the totals."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import NetDiag

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model, loss_of = build(name, str(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()

    times: dict[bool, list[float]] = {True: [], False: []}
    with (
        tempfile.TemporaryDirectory() as logs,
        SummaryWriter(logs) as writer,
        NetDiag(model, optimizer, writer, every_n_steps=2),
    ):
        for i in range(4 + timed):  # steps 0, 2, ... are logging steps
            start = time.perf_counter()
            step()
            if i >= 4:
                times[i % 2 == 0].append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profiled(activities=activities) as prof:
            step()  # a logging step
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    on_device = sum(e.self_device_time_total for e in events) / 1e3
    on_host = sum(e.self_cpu_time_total for e in events) / 1e3
    head = (
        f"## {name} on {torch.cuda.get_device_name() if cuda else 'the CPU'}: logging step "
        f"{statistics.median(times[True]) * 1e3:.1f} ms, step between {statistics.median(times[False]) * 1e3:.1f} ms "
        f"(medians of {timed // 2}); profiled logging step: {on_host:.1f} ms of ops on the host"
        + (f", {on_device:.1f} ms of kernels on the device" if cuda else "")
    )
    return head + "\n" + events.table(sort_by=key, row_limit=12, max_name_column_width=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "resnet50"], choices=["gpt2-124m", "resnet50"])
    parser.add_argument("--as-gpu", action="store_true", help="count netdiag's GPU paths (see above)")
    parser.add_argument("--profile", action="store_true", help="time and profile a logging step instead (on CUDA)")
    args = parser.parse_args()
    if args.profile:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for name in args.models:
            print(profile(name, device), flush=True)
        return
    lines = ["| model | bare step: ops (kernels), host reads | logging step: ops added (kernels), host reads added | "
             "step between: ops added (kernels), host reads added |", "|---|---|---|---|"]  # fmt: skip
    for name in args.models:
        bare, ours = count(name, False, args.as_gpu), count(name, True, args.as_gpu)
        added = [[a - b for a, b in zip(ours[i], bare[i], strict=True)] for i in (2, 3)]
        cells = [bare[2], *added]
        lines.append(
            f"| {name} | " + " | ".join(f"{ops:,} ({kernels:,}), {reads}" for ops, kernels, reads in cells) + " |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
