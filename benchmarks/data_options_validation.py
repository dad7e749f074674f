#!/usr/bin/env python3
"""Which training-data options help? Train one brain stage per setting, same steps and seed, and compare on validation.

Settings (`SETTINGS`): the plain T1 data of today, and each of train_brain.py's data options alone and
together (other real contrasts, label-driven synthesis, cropped fields of view, blur). Each is a full
``train_brain.py`` run in ``<out>/<setting>`` (resumable: rerun the same command), exported into
``<out>/<setting>/models``; the table compares what its export measured on the SAME validation pairs
(train_brain.validation_set: the held-out anatomy, T1, the stage's plain variation), one pass of the
network, mean Dice of the 8 structures:

- ``val soi_mse``: the lowest validation MSE(T(S_s), S_t) (what picks the checkpoint);
- ``Dice``: unregistered -> one pass;
- ``Dice, cropped``: the same pairs with the moving image's field of view cropped; one pass must not end
  below the unregistered Dice.

One pass is not the whole pipeline: the setting chosen here is then checked with test-time refinement by
``benchmarks/brain_validation.py``.

    python benchmarks/data_options_validation.py --stage affine --steps 1500 --threads 1   # hours on a CPU
    python benchmarks/data_options_validation.py --quick                                    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_brain  # noqa: E402

SETTINGS = {
    "t1": [],
    "contrasts": ["--contrasts", "t1,t2,pd"],
    "synth": ["--synth-prob", "0.5"],
    "crop": ["--crop-prob", "0.3"],
    "blur": ["--blur-mm", "1.5"],
    "all": ["--contrasts", "t1,t2,pd", "--synth-prob", "0.5", "--crop-prob", "0.3", "--blur-mm", "1.5"],
}


def table(rows: dict[str, dict]) -> str:
    lines = ["| setting | flags | steps | val soi_mse | Dice | Dice, cropped moving |", "| --- | --- | --- | --- | --- | --- |"]
    for name, s in rows.items():
        v, c = s["validation"], s["validation_cropped"]
        worse = " (worse than unregistered)" if c["mean_dice_one_pass"] < c["mean_dice_unregistered"] else ""
        lines.append(f"| {name} | {train_brain.data_flags(s['data_options']) or '(none)'} | {s['steps']} | "
                     f"{s['best_val_soi_mse']:.6f} | {v['mean_dice_unregistered']:.3f} -> {v['mean_dice_one_pass']:.3f} | "
                     f"{c['mean_dice_unregistered']:.3f} -> {c['mean_dice_one_pass']:.3f}{worse} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=str(train_brain.REPO / "runs" / "data-options"))
    p.add_argument("--stage", choices=("affine", "bspline"), default="affine")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps at 32^3 x 6 mm, tiny networks, 2 pairs")
    p.add_argument("--report", help="also write the table (Markdown) here")
    args, rest = p.parse_known_args(argv)  # the rest goes to train_brain.py (--steps, --threads, --data, ...)
    if args.quick:
        rest = ["--steps", "4", "--grid", "32", "--spacing", "6", "--val-pairs", "2", "--val-every", "2",
                "--itn-channels", "4", "8", "--stn-channels", "4", "8", "8"] + rest
    rows = {}
    for name in args.settings:
        out = Path(args.out) / name
        train_brain.main(["--stage", args.stage, "--out", str(out), "--models", str(out / "models"),
                          "--no-progress"] + SETTINGS[name] + rest)
        rows[name] = json.loads((out / args.stage / "summary.json").read_text())
    text = table(rows)
    print(text)
    if args.report:
        Path(args.report).write_text(f"# Training-data options, {args.stage} stage\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
