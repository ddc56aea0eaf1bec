"""Replays the lecture's incremental fixes of makemore's MLP and shows what the diagnostics saw.

    python examples/reproduce_lecture.py                                    # quick: 5,000 steps a preset
    python examples/reproduce_lecture.py --full --data ../shared/data/names.txt   # the lecture's 200,000

For each preset: the loss at initialisation and after training, beside the lecture's, and from the
diagnostics the hidden Tanh layer's saturation and dead units at init and at the end, the grad:data of
the hidden and output weights, and their update:data (log10) at the end. The point is that the
diagnostics show *why* each fix helps: the softmax fix removes the huge init loss, the tanh fix and
kaiming init remove the saturation, batchnorm keeps it away whatever the init.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

from makemore_mlp import Config, Result, train

# preset: (loss at init, train, val) from the lecture's notebook; init loss ~27 before, -ln(1/27) after the fix
LECTURE = {
    "original": (27.0, 2.1245, 2.1682),
    "fix-softmax": (3.2958, 2.07, 2.13),
    "fix-tanh": (3.2958, 2.0356, 2.1027),
    "kaiming": (3.2958, 2.0377, 2.1070),
    "batchnorm": (3.2958, 2.0668, 2.1048),
}


def diagnostics(r: Result) -> dict[str, float]:
    """What the callbacks recorded for the hidden layer and the weights, at init and at the end."""
    hidden = next(iter(r.saturation.layer_types))
    weights = [n for n in r.grad_data.param_shapes if n.startswith("net.")]
    w_hidden, w_out = weights[0], weights[-1]

    def series(cb, metric: str, name: str) -> list[tuple[int, float]]:
        return cb.history.get(f"netdiag/{metric}/{name}", [(0, math.nan)])

    sat = series(r.saturation, "act_saturated_pct", hidden)
    dead = series(r.saturation, "act_dead_pct", hidden)
    return {
        "sat_init": sat[0][1],
        "sat_end": sat[-1][1],
        "dead_init": dead[0][1],
        "dead_end": dead[-1][1],
        "gd_hidden": series(r.grad_data, "grad_data_ratio", w_hidden)[-1][1],
        "gd_out": series(r.grad_data, "grad_data_ratio", w_out)[-1][1],
        "ud_hidden": series(r.update, "update_data_log10", w_hidden)[-1][1],
        "ud_out": series(r.update, "update_data_log10", w_out)[-1][1],
        "flagged": ", ".join(sorted({v.check for v in r.report.verdicts})) or "-",
    }


def row(r: Result) -> dict[str, object]:
    lecture = LECTURE[r.cfg.preset]
    return {
        "preset": r.cfg.preset,
        "init": r.init_loss,
        "train": r.train_loss,
        "val": r.val_loss,
        "lecture_init": lecture[0],
        "lecture_train": lecture[1],
        "lecture_val": lecture[2],
        **diagnostics(r),
    }


def markdown(rows: list[dict], steps: int, source: str) -> str:
    head = (
        f"{steps} steps a preset, data: {source}\n\n"
        "| preset | init loss (lecture) | train / val (lecture) | hidden saturated % init -> end | "
        "dead units % init -> end | grad:data hidden / out | update:data hidden / out | report flags |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {x['preset']} | {x['init']:.2f} ({x['lecture_init']:.1f}) | {x['train']:.4f} / {x['val']:.4f} "
        f"({x['lecture_train']} / {x['lecture_val']}) | {x['sat_init']:.1f} -> {x['sat_end']:.1f} | "
        f"{x['dead_init']:.1f} -> {x['dead_end']:.1f} | {x['gd_hidden']:.1e} / {x['gd_out']:.1e} | "
        f"{x['ud_hidden']:.2f} / {x['ud_out']:.2f} | {x['flagged']} |"
        for x in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="words file (default: the census names of `names`)")
    parser.add_argument("--full", action="store_true", help="the lecture's 200,000 steps (default: 5,000)")
    parser.add_argument("--steps", type=int, default=None, help="steps per preset, overriding --full")
    parser.add_argument("--presets", nargs="+", default=list(LECTURE), choices=list(LECTURE))
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    steps = args.steps or (200_000 if args.full else 5_000)
    rows, source = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = Config(
                preset=preset, data=args.data, max_steps=steps, every_n_steps=max(steps // 100, 1), root_dir=tmp
            )
            result = train(cfg, quiet=True)
            source = result.data_source
            rows.append(row(result))
            print(f"{preset}: init {result.init_loss:.4f}, train {result.train_loss:.4f}, val {result.val_loss:.4f}")
    print()
    print(markdown(rows, steps, source))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "data": source, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
