"""What a logging step launches: the ATen ops dispatched (each one a kernel launch on a GPU) and the reads of a
tensor's value by the host (each one a synchronisation on a GPU) that `NetDiag`, at its defaults, adds to a step of
GPT-2 124M's and ResNet-50's shapes, counted on the CPU (issue 35).

    python benchmarks/logging_step_ops.py                  # both models
    python benchmarks/logging_step_ops.py --models gpt2-124m

Each model trains 4 steps with AdamW (GPT-2: transformers' default config, 2 x 64 tokens; ResNet-50: torchvision's,
2 images of 224 px), bare and then with ``NetDiag(model, optimizer, writer, every_n_steps=2)`` writing TensorBoard
events to a temporary directory; step 2 is a logging step (not the first: step 0 also measures the network at
initialisation), step 3 a step between. The ops are counted by a ``TorchDispatchMode`` (every ATen op, the model's
and the optimizer's too: the table gives what netdiag adds), the host reads by a ``TorchFunctionMode`` (``item``,
``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``, ``numpy``, ``to`` the host).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"}


class Count(TorchDispatchMode):
    """Every ATen op dispatched while it is on, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Reads(TorchFunctionMode):
    """Every read of a tensor's value by the host while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])
        if name in READS or to_host:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def build(name: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    """The model and a function of it that computes one step's loss on a fixed batch."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt2-124m":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0))
        tokens = torch.randint(0, 50257, (2, 64), generator=g)
        return model, lambda m: m(tokens, labels=tokens).loss
    import torchvision

    model = torchvision.models.resnet50()
    x, y = torch.randn(2, 3, 224, 224, generator=g), torch.randint(0, 1000, (2,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), y)


def count(name: str, with_netdiag: bool) -> list[tuple[int, int]]:
    """(ops, host reads) of each of 4 steps."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_netdiag import NetDiag

    torch.manual_seed(0)
    model, loss_of = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = []
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as stack:
        if with_netdiag:
            writer = SummaryWriter(logs)
            stack.callback(writer.close)
            stack.enter_context(NetDiag(model, optimizer, writer, every_n_steps=2))
        for _ in range(4):
            with Count() as ops, Reads() as reads:
                loss = loss_of(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            steps.append((sum(ops.ops.values()), reads.reads))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "resnet50"], choices=["gpt2-124m", "resnet50"])
    args = parser.parse_args()
    lines = ["| model | bare step: ops, host reads | logging step: ops added, host reads added | step between: ops "
             "added, host reads added |", "|---|---|---|---|"]  # fmt: skip
    for name in args.models:
        bare, ours = count(name, False), count(name, True)
        (ops, reads), logging, between = bare[2], ours[2], ours[3]
        lines.append(
            f"| {name} | {ops:,}, {reads} | {logging[0] - ops:,}, {logging[1] - reads} | "
            f"{between[0] - bare[3][0]:,}, {between[1] - bare[3][1]} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
