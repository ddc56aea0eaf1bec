"""What the health report says of standard vision models at their default inits: one training step each (224 px,
batch 2, 1,000 classes, random images and labels, AdamW at 1e-4), every meter of ``NetDiag`` at its defaults, and the
report's verdicts. A healthy init gets none; a verdict here is a false alarm to explain or fix.

    python benchmarks/models_at_init.py [--models resnet50 timm:convnext_nano ...]

Models are torchvision's by name, ``timm:`` for timm's. Prints a markdown table (model, verdicts, seconds).
"""

from __future__ import annotations

import argparse
import time
import warnings

TORCHVISION = (
    "resnet50", "vgg11_bn", "densenet121", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf",
    "shufflenet_v2_x1_0", "squeezenet1_1", "swin_t", "googlenet", "mnasnet0_5", "resnext50_32x4d", "convnext_tiny",
)  # fmt: skip
TIMM = (
    "resnet26d", "efficientnet_b0", "vit_small_patch16_224", "deit_tiny_patch16_224", "mixer_s16_224", "convnext_nano",
    "cspdarknet53", "ghostnet_100", "regnety_004", "levit_128s", "poolformer_s12", "coat_lite_tiny", "mobilevit_xs",
    "efficientformer_l1", "hrnet_w18_small",
)  # fmt: skip


def build(name: str):
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:])
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return torchvision.models.get_model(name, **kwargs)


def verdicts_at_init(name: str) -> tuple[list[str], float]:
    import torch
    import torch.nn.functional as F

    from lightning_netdiag import NetDiag, report

    torch.manual_seed(0)
    model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    with NetDiag(model, optimizer, every_n_steps=1) as diag:
        loss = F.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.randint(0, 1000, (2,)))
        loss.backward()
        diag.loss(loss)
        optimizer.step()
    said = [f"{v.check} ({v.layer}: {v.value:.3g})" for v in report.summarize(**diag.records()).verdicts]
    return said, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[*TORCHVISION, *(f"timm:{n}" for n in TIMM)])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print("| model | verdicts at init | seconds |\n|---|---|---|")
    for name in args.models:
        said, seconds = verdicts_at_init(name)
        print(f"| {name} | {'; '.join(said) or 'none'} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
