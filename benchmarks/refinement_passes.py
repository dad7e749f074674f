#!/usr/bin/env python3
"""Choose the number of B-spline refinement passes stored in a brain model on VALIDATION pairs.

A pass (`istn.registration.register`'s ``passes``) after the first: the moving image warped through the
B-spline so far, the ITN's maps of it, a B-spline for what is left (its inverse-consistent one pass, refined
on those maps), added to the B-spline so far (still one B-spline on the same control grid). The network then
looks again at a moving head already close to the fixed one, as a user's second Apply would, but without
resampling the image twice.

Validation pairs as `refinement_validation.py` builds them (never the evaluation subject): ``spm_avg305``
(never trained on) in seeded scanner positions (seeds 500..), whole head and brain-extracted, -> ICBM 2009c.
Per pair: the affine model once (its own settings), then the B-spline model from it with each number of
passes: sub-cortical Dice (8 protocol labels), brain-mask Dice (harm outside the structures), folding,
iterations and seconds. Chosen: the most Dice (mean over the pairs), fewer passes winning a tie (within
`DICE_TIE`), among the counts that fold nothing and keep the mean brain-mask Dice within `MASK_TIE` of one
pass's. ``--write-models`` stores it (``refinement.passes``) in the B-spline model and its card.

    python benchmarks/refinement_passes.py --data /work/braindata --pairs 6 --passes 1,2,3 [--write-models]
    python benchmarks/refinement_passes.py --family brain-synth --out benchmarks/results/refinement_passes_synth ...
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from brain_validation import mean_dice, validation_inputs  # noqa: E402
from refinement_validation import mask_dice, store_passes, validation_pairs  # noqa: E402
from report import write_report  # noqa: E402

from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.metrics import folding_fraction  # noqa: E402
from istn.registration import register  # noqa: E402

DICE_TIE = 1e-3  # mean sub-cortical Dice differences below this are ties (fewer passes win)
MASK_TIE = 1e-3  # brain-mask Dice may drop this much below one pass's
CARD_BEGIN = "<!-- refinement passes: written by benchmarks/refinement_passes.py -->"
CARD_END = "<!-- end of refinement passes -->"


def choose(rows: dict[int, dict]) -> int:
    """The pass count with the most mean Dice (ties to fewer) among those that fold nothing and keep the brain
    mask (see the module docstring); one pass when none else qualifies."""
    base = rows[1]["mask_dice"]
    ok = [p for p, r in rows.items() if p == 1 or (r["folding_max"] == 0.0 and r["mask_dice"] >= base - MASK_TIE)]
    best = max(rows[p]["dice"] for p in ok)
    return min(p for p in ok if rows[p]["dice"] >= best - DICE_TIE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--family", default="brain-t1", help="file name stem of the model pair (<family>-affine.pt, ...)")
    p.add_argument("--val-anatomy", default="spm_avg305")
    p.add_argument("--pairs", type=int, default=6, help="scanner positions (each as whole head and brain)")
    p.add_argument("--passes", default="1,2,3", help="pass counts to compare (1 always)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-models", action="store_true", help="store the choice in the B-spline model and its card")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refinement_passes"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, models = Path(args.data), Path(args.models)
    affine = load_model(models / f"{args.family}-affine.pt")
    bspline = load_model(models / f"{args.family}-bspline.pt")
    counts = sorted({1, *(int(c) for c in args.passes.split(","))})
    fixed, fixed_labels, _, _ = validation_inputs(data, args.val_anatomy)
    fixed_mask = sitk.Cast(fixed > 0, sitk.sitkUInt8)
    pairs, _, _ = validation_pairs(data, args.val_anatomy, args.pairs)
    per_pair = []
    for label, moving, labels, mask in pairs:
        ra = register(fixed, moving, affine, device="cpu", threads=args.threads)
        row = {"pair": label, "affine_dice": mean_dice(fixed_labels, labels, ra.transform),
               "affine_mask_dice": mask_dice(fixed_mask, mask, ra.transform), "passes": {}}
        for c in counts:
            t0 = time.perf_counter()
            rb = register(fixed, moving, bspline, device="cpu", threads=args.threads, initial_transform=ra.transform,
                          passes=c)
            seconds = time.perf_counter() - t0
            row["passes"][c] = {"dice": mean_dice(fixed_labels, labels, rb.transform),
                                "mask_dice": mask_dice(fixed_mask, mask, rb.transform),
                                "folding": folding_fraction(rb.transform, fixed, fixed_mask),
                                "iterations": rb.iterations, "seconds": seconds}
        per_pair.append(row)
        print(f"{label}: affine {row['affine_dice']:.3f}, B-spline " + ", ".join(
            f"{c} pass{'es' if c > 1 else ''} {r['dice']:.3f}" for c, r in row["passes"].items()), flush=True)

    def mean(key: str, c: int) -> float:
        return float(np.mean([r["passes"][c][key] for r in per_pair]))

    rows = {c: {"dice": mean("dice", c), "mask_dice": mean("mask_dice", c), "iterations": mean("iterations", c),
                "seconds": mean("seconds", c), "folding_max": max(r["passes"][c]["folding"] for r in per_pair),
                "better_pairs": sum(r["passes"][c]["dice"] > r["passes"][1]["dice"] + 1e-4 for r in per_pair),
                "worse_pairs": sum(r["passes"][c]["dice"] < r["passes"][1]["dice"] - 1e-4 for r in per_pair)}
            for c in counts}
    for kind in ("whole head", "brain"):
        for c in counts:
            rows[c][f"dice_{kind.replace(' ', '_')}"] = float(np.mean(
                [r["passes"][c]["dice"] for r in per_pair if r["pair"].startswith(kind)]))
    chosen = choose(rows)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/refinement_passes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# B-spline refinement passes chosen on validation pairs ({args.family})", "",
          f"Generated by `{cmd}` on {created}. Moving: `{args.val_anatomy}` (never trained on) in {args.pairs} seeded "
          "scanner positions (seeds 500..), whole head and brain-extracted; fixed: ICBM 2009c. The affine model "
          "once per pair (its own settings), then the B-spline model from it with each pass count (its other "
          "settings its own). Dice: mean of the 8 sub-cortical structures; brain-mask Dice: harm outside them; "
          f"seconds: the B-spline call, {args.threads} thread(s) on a shared 2-core machine (indicative only).", "",
          f"Affine: Dice {np.mean([r['affine_dice'] for r in per_pair]):.4f}, brain-mask Dice "
          f"{np.mean([r['affine_mask_dice'] for r in per_pair]):.4f}.", "",
          "| passes | Dice | whole head | brain-extracted | pairs better / worse than 1 pass | brain-mask Dice | "
          "folding (max) | iterations | B-spline s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, r in rows.items():
        md.append(f"| {c}{' (chosen)' if c == chosen else ''} | {r['dice']:.4f} | {r['dice_whole_head']:.4f} | "
                  f"{r['dice_brain']:.4f} | {r['better_pairs']} / {r['worse_pairs']} | {r['mask_dice']:.4f} | "
                  f"{r['folding_max']:.4f} | {r['iterations']:.1f} | {r['seconds']:.2f} |")
    md += ["", f"Chosen: **{chosen}** (the most Dice, fewer passes on a tie within {DICE_TIE:g}, among counts that "
           f"fold nothing and keep the brain-mask Dice within {MASK_TIE:g} of one pass's).", "",
           "Per pair (B-spline Dice by pass count):", "",
           "| pair | affine | " + " | ".join(str(c) for c in counts) + " |",
           "| --- | --- |" + " --- |" * len(counts)]
    md += [f"| {r['pair']} | {r['affine_dice']:.3f} | " + " | ".join(f"{r['passes'][c]['dice']:.3f}" for c in counts)
           + " |" for r in per_pair]
    summary = {"created": created, "command": cmd, "family": args.family, "validation_anatomy": args.val_anatomy,
               "pairs": per_pair, "rows": {str(c): r for c, r in rows.items()}, "chosen": chosen}
    write_report(args.out, summary, md)
    if args.write_models:
        r, one = rows[chosen], rows[1]
        section = "\n".join([
            CARD_BEGIN, "## Refinement passes (chosen on validation pairs)", "",
            f"**{chosen}** (`--passes`): after the first refinement, the network looks again at the moving image "
            "warped so far and a B-spline for what is left is refined on those maps and added (one B-spline in the "
            f"end). Chosen by `benchmarks/refinement_passes.py` ({created}) on {len(per_pair)} validation pairs: "
            f"sub-cortical Dice {one['dice']:.4f} with one pass, {r['dice']:.4f} with {chosen} "
            f"({r['better_pairs']} pairs better, {r['worse_pairs']} worse), brain-mask Dice {one['mask_dice']:.4f} "
            f"-> {r['mask_dice']:.4f}, folding {r['folding_max']:.4f}, {one['iterations']:.1f} -> "
            f"{r['iterations']:.1f} iterations. Tables: `benchmarks/results/{Path(args.out).name}.md`.", CARD_END]) + "\n"
        store_passes(bspline, chosen, f"benchmarks/refinement_passes.py ({created}; {Path(args.out).name}.md)",
                     section, CARD_BEGIN, CARD_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
